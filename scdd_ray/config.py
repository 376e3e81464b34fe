"""Building a run's configuration: schema defaults, then the dataset's preset, then a config file, then the
user's flags; typed and validated once, at the boundary.

Everything a user can get wrong is checked here, before any output is
written, and reported as a ConfigError naming the configuration field
(`recover.bn_coef`) and the value; front ends name fields their own way
(the CLI as flags, a YAML file as keys). Every front end (`distill`,
`squeeze`, `posttrain`, `bench`, `tune`) builds its configuration through
`build_config`, so they all start from the same preset.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing

import yaml

from . import data, presets
from .core import ssl
from .core.bn import NORMALIZE, parse_bn_weights
from .core.class_bn import FORMS as CLASS_BN_FORMS
from .core.committee import SPACES
from .core.configs import SUPERVISED, PosttrainConfig, RecoverConfig, SqueezeConfig
from .core.relabel import CROPS, MIX_CODES
from .errors import ConfigError
from .methods import METHODS, RECOVERY_METHODS, base_method, recipe_settings
from .models.factory import ARCHS, TIMM_PREFIX, timm_model_exists
from .schema import SECTIONS, TEACHER_BACKBONE, DistillConfig, teacher_paths

INITS = ("noise", "real")
OPTIMIZERS = ("adamw", "sgd")
AMPS = ("bf16", "fp16", "none")
LABELS = ("soft", "hard")
AUGMENT_PER = ("image", "batch")
TEACHER_BN = ("eval", "train")
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager")
RUN_FILE = "run.json"  # what every distill run writes: {"fingerprint": ..., "config": <a valid config file>}


def ssl_methods() -> tuple[str, ...]:
    return ssl.names()


def squeeze_methods() -> tuple[str, ...]:
    return ssl.names() + (SUPERVISED,)


# --- the schema's fields and types ---------------------------------------------------------

def section_class(name: str) -> type:
    return {"squeeze": SqueezeConfig, "recover": RecoverConfig, "posttrain": PosttrainConfig}[name]


def field_types(cls: type) -> dict[str, object]:
    """Field name -> its type, for a schema dataclass."""
    return typing.get_type_hints(cls)


def recipe_fields() -> dict[str, object]:
    """Every settable field of a run's recipe ('arch', 'recover.lr', ...) -> its type."""
    out = {k: t for k, t in field_types(DistillConfig).items() if k not in SECTIONS}
    for s in SECTIONS:
        out.update({f"{s}.{k}": t for k, t in field_types(section_class(s)).items()})
    return out


def schema_default(key: str):
    """The schema's default of recipe field `key`."""
    section, _, name = key.rpartition(".")
    obj = section_class(section)() if section else DistillConfig()
    return getattr(obj, name)


def flatten(mapping: dict, where: str = "") -> dict:
    """A nested configuration mapping (a YAML file, `to_dict()`) as dotted keys: {'recover.lr': 0.4}."""
    out = {}
    for k, v in mapping.items():
        key = f"{where}{k}"
        if k in SECTIONS and not where:
            if not isinstance(v, dict):
                raise ConfigError(key, f"must be a mapping of {k} settings (got {v!r})")
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def coerce(value, typ, key: str):
    """`value` as schema type `typ` (YAML lists become tuples, integers become floats where a float is
    expected); a value of another type is a ConfigError naming `key`."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        typ = next(a for a in args if a is not type(None))
        args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list (got {value!r})")
        inner = args[0]
        return tuple(coerce(v, inner, key) for v in value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number (got {value!r})")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer (got {value!r})")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false (got {value!r})")
        return value
    if typ is str and not isinstance(value, str):
        raise ConfigError(key, f"must be a string (got {value!r})")
    return value


# --- configuration files ---------------------------------------------------------------------

def read_config_file(path: str, field: str = "config") -> dict:
    """A configuration file as a mapping: YAML (JSON is YAML), or a run record (run.json), whose `config`
    is the configuration of that run."""
    if not os.path.isfile(path):
        raise ConfigError(field, f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(field, f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(field, f"{path} is not UTF-8 text (is it a YAML file?)") from None
    except OSError as e:
        raise ConfigError(field, f"{path} is unreadable ({e.strerror or type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(field, f"{path} must hold a mapping of settings at its top level")
    if set(raw) == {"fingerprint", "config"} and isinstance(raw["config"], dict):  # a run record
        return raw["config"]
    return raw


def to_yaml(cfg: DistillConfig) -> str:
    """The configuration as YAML, a valid config file (tuples as lists)."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False, default_flow_style=None)


# --- building ------------------------------------------------------------------------------

def build_config(overrides: dict | None = None, file: dict | None = None, *, gpu: bool | None = None,
                 run: bool = True) -> DistillConfig:
    """The validated configuration: schema defaults < the dataset's preset < `file` < `overrides`.

    `overrides` are what the user set, flat ('dataset', 'recover.lr'); a None
    value is taken as given (e.g. no random-resized-crop). `file` is a parsed
    config file (nested sections). The preset is the dataset's GPU one when
    `gpu` (default: when `num_gpus` is set), else its CPU one. With `run`,
    the settings must also make a distill run (e.g. scdd needs an SSL backbone).
    """
    known = recipe_fields()
    given = {**flatten(file or {}), **(overrides or {})}
    for k in given:
        if k not in known:
            raise ConfigError(k, "is not a known setting")
    dataset = given.get("dataset", schema_default("dataset"))
    data.get(dataset)  # an unknown dataset is named before its preset is looked for
    if gpu is None:
        gpu = bool(given.get("num_gpus"))
    values = flatten(presets.load(dataset, gpu))
    for k in values:
        if k not in known:
            raise ConfigError(k, f"is not a known setting (in preset {presets.file_name(dataset, gpu)})")
    if "image_size" not in given:
        values["image_size"] = data.preset_image_size(dataset, given.get("data_dir"),
                                                      values.get("image_size", schema_default("image_size")))
    # A named recipe's recover settings sit over the preset, under what the user gives.
    method = given.get("method")
    values.update(recipe_settings(method))
    # The backbone objective follows the method unless the user chose one.
    if base_method(method) in ("sre2l", "random") and "squeeze.method" not in given:
        values["squeeze.method"] = SUPERVISED
    values.update(given)
    cfg = _construct({k: coerce(v, known[k], k) for k, v in values.items()})
    validate(cfg)
    if run:
        check_run(cfg)
    data.check_options(dataset, cfg.data_options())
    return cfg


def _construct(values: dict) -> DistillConfig:
    nested = {s: {} for s in SECTIONS}
    top = {}
    for k, v in values.items():
        section, _, name = k.rpartition(".")
        (nested[section] if section else top)[name] = v
    return DistillConfig(**top, **{s: section_class(s)(**nested[s]) for s in SECTIONS})


def build_distill_config(dataset: str, out: str, overrides: dict | None = None, file: dict | None = None,
                         gpu: bool | None = None) -> DistillConfig:
    """`build_config` of a run of `dataset` writing to `out`."""
    return build_config({"dataset": dataset, "out": out, **(overrides or {})}, file, gpu=gpu)


# --- validation ------------------------------------------------------------------------------

def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _positive_int(value, key: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key,
           f"must be a positive integer (got {value!r})")


def _nonneg_int(value, key: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, key,
           f"must be a non-negative integer (got {value!r})")


def _positive_float(value, key: str) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key,
           f"must be a positive number (got {value!r})")


def _nonneg_float(value, key: str) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, key,
           f"must be a non-negative number (got {value!r})")


def _choice(value, choices, key: str) -> None:
    _check(value in choices, key, f"unknown value {value!r} (choose from {', '.join(choices)})")


def _scale(value, key: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) for v in value) and 0 < value[0] <= value[1] <= 1)
    _check(ok, key, f"must be two numbers 0 < lo <= hi <= 1 (got {value!r})")


def validate_arch(name: str, key: str) -> None:
    _check(isinstance(name, str) and (name in ARCHS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))),
           key, f"unknown arch {name!r} (choose from {', '.join(ARCHS)} or timm:<name>)")
    if name.startswith(TIMM_PREFIX):  # checked here, not after run.json is written
        _check(timm_model_exists(name[len(TIMM_PREFIX):]), key, f"timm has no architecture {name[len(TIMM_PREFIX):]!r}")


def _timm_width(arch: str, width: float, key: str) -> None:
    _check(not arch.startswith(TIMM_PREFIX) or width == 1, key,
           f"must be 1 for {arch} (got {width:g}); only our resnets scale their width")


def validate_recovery_grid(archs, methods) -> None:
    """Lists of recovery archs (field `archs`) and methods (`methods`), as a Tune YAML or `bench models` give."""
    _check(isinstance(archs, (list, tuple)) and bool(archs), "archs", f"must name at least one arch (got {archs!r})")
    for name in archs:
        try:
            validate_arch(name, "archs")
        except ConfigError as e:
            raise ConfigError("archs", e.message) from None
    _check(isinstance(methods, (list, tuple)) and bool(methods) and all(m in RECOVERY_METHODS for m in methods),
           "methods", f"must name one or more of {', '.join(RECOVERY_METHODS)} (got {list(methods)!r})")


def validate_squeeze(s: SqueezeConfig) -> None:
    _choice(s.method, squeeze_methods(), "squeeze.method")
    for k in ("epochs", "batch_size", "probe_epochs"):
        _positive_int(getattr(s, k), f"squeeze.{k}")
    _positive_float(s.lr, "squeeze.lr")
    _nonneg_float(s.weight_decay, "squeeze.weight_decay")
    _positive_float(s.temperature, "squeeze.temperature")
    _scale(s.crop_scale, "squeeze.crop_scale")


def validate_recover(r: RecoverConfig) -> None:
    _positive_int(r.iterations, "recover.iterations")
    _positive_float(r.lr, "recover.lr")
    _nonneg_float(r.bn_coef, "recover.bn_coef")
    try:
        parse_bn_weights(r.bn_weights)
    except ValueError as e:
        raise ConfigError("recover.bn_weights", str(e)) from None
    _nonneg_int(r.jitter, "recover.jitter")
    _scale(r.crop_scale, "recover.crop_scale", allow_none=True)
    _choice(r.init, INITS, "recover.init")
    _positive_int(r.classes_per_batch, "recover.classes_per_batch")
    _choice(r.bn_normalize, NORMALIZE, "recover.bn_normalize")
    _choice(r.augment_per, AUGMENT_PER, "recover.augment_per")
    _positive_int(r.ipc_per_shard, "recover.ipc_per_shard")
    _choice(r.compile_backend, COMPILE_BACKENDS, "recover.compile_backend")
    _nonneg_float(r.class_bn_coef, "recover.class_bn_coef")
    _check(not (r.class_bn_coef > 0 and r.compile), "recover.class_bn_coef",
           "category-aware matching runs uncompiled: set `recover.compile` false with it")
    _choice(r.class_bn_form, CLASS_BN_FORMS, "recover.class_bn_form")
    _check(isinstance(r.bn_smoothing, (int, float)) and 0 <= r.bn_smoothing < 1, "recover.bn_smoothing",
           f"must be a momentum in [0, 1) (got {r.bn_smoothing!r}; 0: off)")
    _check(not (r.bn_smoothing > 0 and r.compile), "recover.bn_smoothing",
           "smoothed matching runs uncompiled: set `recover.compile` false with it")
    _nonneg_int(r.init_pool, "recover.init_pool")
    _nonneg_int(r.init_crops, "recover.init_crops")
    _positive_int(r.init_patches, "recover.init_patches")
    _check(r.init_pool == 0 or r.init == "real", "recover.init_pool",
           f"chooses real starting images: it needs `recover.init` real (got {r.init!r})")
    for key, off in (("init_crops", 0), ("init_patches", 1)):
        _check(getattr(r, key) == off or r.init_pool > 0, f"recover.{key}",
               "applies to images chosen by confidence: set `recover.init_pool` too")
    _choice(r.amp, ("bf16", "none"), "recover.amp")


def validate_posttrain(p: PosttrainConfig) -> None:
    validate_arch(p.student, "posttrain.student")
    _positive_float(p.student_width, "posttrain.student_width")
    _timm_width(p.student, p.student_width, "posttrain.student_width")
    for k in ("epochs", "batch_size"):
        _positive_int(getattr(p, k), f"posttrain.{k}")
    _choice(p.optimizer, OPTIMIZERS, "posttrain.optimizer")
    _positive_float(p.lr, "posttrain.lr")
    _nonneg_float(p.weight_decay, "posttrain.weight_decay")
    _positive_float(p.temperature, "posttrain.temperature")
    _choice(p.mix, tuple(MIX_CODES), "posttrain.mix")
    _check(0 <= p.mix_prob <= 1, "posttrain.mix_prob", f"must be in [0, 1] (got {p.mix_prob!r})")
    _scale(p.crop_scale, "posttrain.crop_scale")
    _nonneg_int(p.eval_every, "posttrain.eval_every")
    _nonneg_int(p.checkpoint_every, "posttrain.checkpoint_every")
    _choice(p.amp, AMPS, "posttrain.amp")
    _choice(p.labels, LABELS, "posttrain.labels")
    _choice(p.crop, CROPS, "posttrain.crop")
    _check(isinstance(p.cosine_period, (int, float)) and math.isfinite(p.cosine_period) and p.cosine_period >= 1,
           "posttrain.cosine_period", f"must be a number >= 1 (got {p.cosine_period!r})")
    _choice(p.teacher_bn, TEACHER_BN, "posttrain.teacher_bn")
    _choice(p.committee, SPACES, "posttrain.committee")
    _check(isinstance(p.ema, (int, float)) and 0 <= p.ema < 1, "posttrain.ema",
           f"must be a decay in [0, 1) (got {p.ema!r}; 0 evaluates the student itself)")


def validate(cfg: DistillConfig) -> None:
    """Every field on its own (types were checked when the configuration was built)."""
    data.get(cfg.dataset)
    _positive_int(cfg.image_size, "image_size")
    _check(cfg.image_size >= 8, "image_size", f"must be at least 8 (got {cfg.image_size})")
    validate_arch(cfg.arch, "arch")
    _positive_float(cfg.width, "width")
    _timm_width(cfg.arch, cfg.width, "width")
    _positive_int(cfg.ipc, "ipc")
    _choice(cfg.method, METHODS, "method")
    _nonneg_int(cfg.seed, "seed")
    _nonneg_int(cfg.num_gpus, "num_gpus")
    if cfg.num_workers is not None:
        _positive_int(cfg.num_workers, "num_workers")
    _positive_int(cfg.posttrain_workers, "posttrain_workers")
    validate_teacher(cfg.teacher)
    validate_squeeze(cfg.squeeze)
    validate_recover(cfg.recover)
    need = cfg.ipc * cfg.recover.init_patches ** 2  # one patch per pooled image, none used twice
    _check(cfg.recover.init_pool == 0 or cfg.recover.init_pool >= need, "recover.init_pool",
           f"must pool at least ipc x init_patches^2 = {need} images per class (got {cfg.recover.init_pool})")
    validate_posttrain(cfg.posttrain)


def validate_teacher(teacher: str | None) -> None:
    """A committee (comma-separated paths) names each member once, by its path."""
    paths = teacher_paths(teacher)
    _check(all(paths), "teacher", f"a committee lists checkpoint paths separated by commas (got {teacher!r})")
    if len(paths) > 1:
        _check(TEACHER_BACKBONE not in paths, "teacher",
               f"'{TEACHER_BACKBONE}' relabels alone; a committee lists checkpoint paths (got {teacher!r})")
        _check(len(set(paths)) == len(paths), "teacher", f"a committee names each checkpoint once (got {teacher!r})")


def check_run(cfg: DistillConfig) -> None:
    """What a distill run needs beyond valid fields: settings that fit together."""
    _check(bool(cfg.out), "out", "is required")
    _check(not (cfg.teacher == TEACHER_BACKBONE and cfg.method == "random"), "teacher",
           "`method` random recovers nothing: it has no backbone to relabel with")
    if base_method(cfg.method) == "scdd":
        _check(cfg.squeeze.method in ssl_methods(), "squeeze.method",
               f"`method` {cfg.method} needs a self-supervised backbone (got {cfg.squeeze.method!r})")


def parse_scale(text: str, field: str) -> tuple[float, float] | None:
    """'0.08,1' -> (0.08, 1.0); 'none' -> None."""
    if text.strip().lower() == "none":
        return None
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*,\s*([0-9.eE+-]+)\s*", text)
    if not m:
        raise ConfigError(field, f"expected LO,HI or none (got {text!r})")
    return float(m.group(1)), float(m.group(2))


def with_squeeze_method(cfg: DistillConfig, method: str) -> DistillConfig:
    """`cfg` squeezing a `method` backbone (the recovery backbone's objective, or the supervised teacher's)."""
    return dataclasses.replace(cfg, squeeze=dataclasses.replace(cfg.squeeze, method=method))
