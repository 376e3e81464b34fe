"""The configuration of a run: typed, frozen, filled from a dataset's preset
and the user's overrides, and validated at the boundary.

Everything a user can get wrong is checked here, before any output is
written, and reported as a ConfigError naming the configuration field
(`recover.bn_coef`) and the value; front ends name fields their own way
(the CLI as flags, a Tune YAML as keys).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from . import data
from .core import ssl
from .core.bn import NORMALIZE, parse_bn_weights
from .core.configs import SUPERVISED, PosttrainConfig, RecoverConfig, SqueezeConfig
from .core.relabel import CROPS, MIX_CODES
from .errors import ConfigError
from .models import ARCHS, TIMM_PREFIX, small_input, timm_model_exists

METHODS = ("scdd", "sre2l", "random")
RECOVERY_METHODS = ("scdd", "sre2l")  # the methods that recover images from a backbone
INITS = ("noise", "real")
OPTIMIZERS = ("adamw", "sgd")
AMPS = ("bf16", "fp16", "none")
LABELS = ("soft", "hard")
SECTIONS = ("squeeze", "recover", "posttrain")
TEACHER_BACKBONE = "backbone"  # `teacher` value: relabel with the recovery backbone instead of the shared teacher


def ssl_methods() -> tuple[str, ...]:
    return ssl.names()


def squeeze_methods() -> tuple[str, ...]:
    return ssl.names() + (SUPERVISED,)


@dataclass(frozen=True)
class DistillConfig:
    dataset: str
    out: str
    data_dir: str | None = None
    image_size: int = 32
    arch: str = "resnet18"
    width: float = 1.0
    ipc: int = 10
    method: str = "scdd"
    seed: int = 0
    backbone: str | None = None
    teacher: str | None = None
    num_gpus: int = 0
    num_workers: int | None = None
    address: str | None = None
    posttrain_workers: int = 1  # Ray Train workers of the post-train stage
    image_column: str | None = None  # Parquet datasets: the columns, when they are not the usual ones
    label_column: str | None = None
    # Choose settings without reading the test split: everything trains on the train split less its
    # validation share (`train-noval`), and top-1 is measured on that validation share.
    holdout: bool = False
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)

    @property
    def small_input(self) -> bool:
        return small_input(self.image_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def data_options(self) -> dict:
        """The dataset's own options that are set (see data.DatasetSpec.options)."""
        return {k: v for k, v in (("image_column", self.image_column), ("label_column", self.label_column))
                if v is not None}

    def split(self, name: str):
        """One split of this run's dataset (data.ImageSet); under `holdout`, "train" is train-noval and
        "test" the validation split."""
        if self.holdout:
            name = HOLDOUT_SPLITS.get(name, name)
        return data.load_split(self.dataset, name, self.data_dir, self.image_size, **self.data_options())

    @property
    def train_split(self) -> str:
        """The split name models of this run are squeezed on (names cached backbones)."""
        return HOLDOUT_SPLITS["train"] if self.holdout else "train"

    @property
    def eval_split(self) -> str:
        return HOLDOUT_SPLITS["test"] if self.holdout else "test"

    def fingerprint(self) -> str:
        """Hash of everything that decides the synthetic images.

        Placement (workers, GPUs, address), the output path and post-training
        settings do not change which images a shard holds, so a run may be
        resumed with other resources or re-evaluated with another student.
        Settings added after the first release are left out while they hold
        their default, so runs made before them keep their fingerprint.
        """
        d = self.to_dict()
        # Compiling and autocast change how the maths runs, not what it is (like the thread count): left out.
        d["recover"].pop("compile")
        d["recover"].pop("amp")
        keep = {k: d[k] for k in ("dataset", "data_dir", "image_size", "arch", "width", "ipc", "method", "seed",
                                  "backbone", "holdout", "squeeze", "recover")}
        keep.update(self.data_options())
        for key, default in LATER_DEFAULTS.items():
            section, _, name = key.rpartition(".")
            where = keep[section] if section else keep
            if where.get(name) == default:
                del where[name]
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Recover settings added after the first release, at the value that reproduces earlier runs.
LATER_DEFAULTS: dict[str, object] = {"recover.augment_per": "image", "recover.ipc_per_shard": 1, "holdout": False}
HOLDOUT_SPLITS = {"train": "train-noval", "test": "val"}
AUGMENT_PER = ("image", "batch")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _positive_int(value, key: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key,
           f"must be a positive integer (got {value!r})")


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
    _check(isinstance(archs, list) and bool(archs), "archs", f"must name at least one arch (got {archs!r})")
    for name in archs:
        try:
            validate_arch(name, "archs")
        except ConfigError as e:
            raise ConfigError("archs", e.message) from None
    _check(isinstance(methods, list) and bool(methods) and all(m in RECOVERY_METHODS for m in methods), "methods",
           f"must name one or more of {', '.join(RECOVERY_METHODS)} (got {methods!r})")


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
    _check(isinstance(r.jitter, int) and r.jitter >= 0, "recover.jitter",
           f"must be a non-negative integer (got {r.jitter!r})")
    _scale(r.crop_scale, "recover.crop_scale", allow_none=True)
    _choice(r.init, INITS, "recover.init")
    _positive_int(r.classes_per_batch, "recover.classes_per_batch")
    _choice(r.bn_normalize, NORMALIZE, "recover.bn_normalize")
    _choice(r.augment_per, AUGMENT_PER, "recover.augment_per")
    _positive_int(r.ipc_per_shard, "recover.ipc_per_shard")
    _check(isinstance(r.grayscale, bool), "recover.grayscale", f"must be true or false (got {r.grayscale!r})")
    _check(isinstance(r.compile, bool), "recover.compile", f"must be true or false (got {r.compile!r})")
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
    _check(isinstance(p.eval_every, int) and p.eval_every >= 0, "posttrain.eval_every",
           f"must be a non-negative integer (got {p.eval_every!r})")
    _check(isinstance(p.checkpoint_every, int) and p.checkpoint_every >= 0, "posttrain.checkpoint_every",
           f"must be a non-negative integer (got {p.checkpoint_every!r})")
    _choice(p.amp, AMPS, "posttrain.amp")
    _choice(p.labels, LABELS, "posttrain.labels")
    _choice(p.crop, CROPS, "posttrain.crop")
    _check(isinstance(p.batch_per_worker, bool), "posttrain.batch_per_worker",
           f"must be true or false (got {p.batch_per_worker!r})")


def validate(cfg: DistillConfig) -> None:
    data.get(cfg.dataset)
    _check(bool(cfg.out), "out", "is required")
    _positive_int(cfg.image_size, "image_size")
    _check(cfg.image_size >= 8, "image_size", f"must be at least 8 (got {cfg.image_size})")
    validate_arch(cfg.arch, "arch")
    _positive_float(cfg.width, "width")
    _timm_width(cfg.arch, cfg.width, "width")
    _positive_int(cfg.ipc, "ipc")
    _choice(cfg.method, METHODS, "method")
    _check(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", f"must be a non-negative integer (got {cfg.seed!r})")
    _check(isinstance(cfg.num_gpus, int) and cfg.num_gpus >= 0, "num_gpus",
           f"must be a non-negative integer (got {cfg.num_gpus!r})")
    if cfg.num_workers is not None:
        _positive_int(cfg.num_workers, "num_workers")
    _positive_int(cfg.posttrain_workers, "posttrain_workers")
    _check(not (cfg.teacher == TEACHER_BACKBONE and cfg.method == "random"), "teacher",
           "`method` random recovers nothing: it has no backbone to relabel with")
    if cfg.method == "scdd":
        _check(cfg.squeeze.method in ssl_methods(), "squeeze.method",
               f"`method` scdd needs a self-supervised backbone (got {cfg.squeeze.method!r})")
    validate_squeeze(cfg.squeeze)
    validate_recover(cfg.recover)
    validate_posttrain(cfg.posttrain)


def _merge(base, overrides: dict, prefix: str):
    known = {f.name for f in dataclasses.fields(base)}
    for k in overrides:
        if k not in known:
            raise ConfigError(f"{prefix}{k}", "is not a known setting")
    return dataclasses.replace(base, **overrides)


def build_distill_config(dataset: str, out: str, overrides: dict | None = None) -> DistillConfig:
    """Preset of `dataset`, then the user's overrides (None values ignored), validated.

    `overrides` holds only what the user set (a None value is taken as given,
    e.g. no random-resized-crop); it is flat for top-level fields and uses
    'squeeze.x', 'recover.x', 'posttrain.x' keys for the nested ones.
    """
    preset = data.get(dataset).preset_for(gpu=bool((overrides or {}).get("num_gpus")))
    top = {k: v for k, v in preset.items() if k not in SECTIONS}
    if "image_size" not in (overrides or {}):
        top["image_size"] = data.preset_image_size(dataset, (overrides or {}).get("data_dir"))
    nested = {s: dict(preset.get(s, {})) for s in SECTIONS}
    for k, v in (overrides or {}).items():
        if "." in k:
            section, name = k.split(".", 1)
            if section not in nested:
                raise ConfigError(k, "is not a known setting")
            nested[section][name] = v
        else:
            top[k] = v
    method = top.get("method", "scdd")
    # The backbone objective follows the method unless the user chose one.
    if method in ("sre2l", "random") and "squeeze.method" not in (overrides or {}):
        nested["squeeze"]["method"] = SUPERVISED
    cfg = DistillConfig(
        dataset=dataset, out=out,
        squeeze=_merge(SqueezeConfig(), nested["squeeze"], "squeeze."),
        recover=_merge(RecoverConfig(), nested["recover"], "recover."),
        posttrain=_merge(PosttrainConfig(), nested["posttrain"], "posttrain."),
        **_known_top(top),
    )
    validate(cfg)
    data.check_options(dataset, cfg.data_options())
    return cfg


def _known_top(top: dict) -> dict:
    known = {f.name for f in dataclasses.fields(DistillConfig)} - {"dataset", "out", *SECTIONS}
    for k in top:
        if k not in known:
            raise ConfigError(k, "is not a known setting")
    return top


def parse_scale(text: str, field: str) -> tuple[float, float] | None:
    """'0.08,1' -> (0.08, 1.0); 'none' -> None."""
    if text.strip().lower() == "none":
        return None
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*,\s*([0-9.eE+-]+)\s*", text)
    if not m:
        raise ConfigError(field, f"expected LO,HI or none (got {text!r})")
    return float(m.group(1)), float(m.group(2))


def build_posttrain_config(dataset: str, overrides: dict, gpu: bool = False) -> PosttrainConfig:
    """`dataset`'s post-train preset (its CPU one unless `gpu`), then the user's overrides (PosttrainConfig
    fields; None ignored), validated."""
    given = {k: v for k, v in overrides.items() if v is not None}
    preset = data.get(dataset).preset_for(gpu).get("posttrain", {})
    cfg = _merge(PosttrainConfig(), {**preset, **given}, "posttrain.")
    validate_posttrain(cfg)
    return cfg


@dataclass(frozen=True)
class SqueezeSetup:
    """What `squeeze` trains: the model and its input size, and how."""

    dataset: str
    arch: str
    width: float
    image_size: int
    cfg: SqueezeConfig

    @property
    def small_input(self) -> bool:
        return small_input(self.image_size)


def build_squeeze_setup(dataset: str, method: str, overrides: dict, data_dir: str | None = None,
                        gpu: bool = False) -> SqueezeSetup:
    """`dataset`'s preset model and squeeze settings (its CPU preset unless `gpu`) with `method` and the
    overrides (arch, width, image_size, epochs; None ignored), validated; `data_dir` for the data's own size."""
    preset = data.get(dataset).preset_for(gpu)
    given = {k: v for k, v in overrides.items() if v is not None}
    for k in given:
        _check(k in ("arch", "width", "image_size", "epochs"), k, "is not a known setting")
    arch, width = given.get("arch", preset["arch"]), given.get("width", preset["width"])
    size = given["image_size"] if "image_size" in given else data.preset_image_size(dataset, data_dir)
    validate_arch(arch, "arch")
    _positive_float(width, "width")
    _positive_int(size, "image_size")
    sq = {**preset.get("squeeze", {}), "method": method}
    if "epochs" in given:
        sq["epochs"] = given["epochs"]
    cfg = _merge(SqueezeConfig(), sq, "squeeze.")
    validate_squeeze(cfg)
    return SqueezeSetup(dataset, arch, width, size, cfg)
