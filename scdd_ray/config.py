"""Typed, frozen run configuration, per-dataset presets, and validation.

Everything a user can get wrong is checked here, before any output is written,
and reported as a ConfigError naming the flag and the value.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
ARCHS = ("resnet18", "resnet50", "resnet101")
METHODS = ("scdd", "sre2l", "random")
RECOVERY_METHODS = ("scdd", "sre2l")  # the methods that recover images from a backbone
SSL_METHODS = ("simclr", "mocov3")
SQUEEZE_METHODS = SSL_METHODS + ("supervised",)
INITS = ("noise", "real")
BN_NORMALIZE = ("none", "mean", "channel")
MIXES = ("cutmix", "mixup", "none")
OPTIMIZERS = ("adamw", "sgd")
AMPS = ("bf16", "fp16", "none")


class ConfigError(ValueError):
    """A user-facing input error; the message is one line naming the flag."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}" if flag else message)


@dataclass(frozen=True)
class SqueezeConfig:
    """Backbone training: SSL pretraining + linear probe, or supervised."""

    method: str = "simclr"
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.06
    weight_decay: float = 5e-4
    temperature: float = 0.5  # NT-Xent / InfoNCE temperature
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip: bool = True
    probe_epochs: int = 100


@dataclass(frozen=True)
class RecoverConfig:
    iterations: int = 1000
    lr: float = 0.4
    bn_coef: float = 0.005
    bn_weights: str = "first:10"
    jitter: int = 4
    crop_scale: tuple[float, float] | None = None  # None: no random-resized-crop
    flip: bool = False
    init: str = "noise"
    classes_per_batch: int = 100
    grayscale: bool = False  # optimise one channel repeated to three
    bn_normalize: str = "none"  # none (paper: sum over layers) | mean | channel


@dataclass(frozen=True)
class PosttrainConfig:
    student: str = "resnet18"
    student_width: float = 1.0
    epochs: int = 200
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 30.0
    mix: str = "cutmix"
    mix_prob: float = 1.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    eval_every: int = 0  # 0: evaluate on the real test split only at the end
    checkpoint_every: int = 0  # epochs between Ray Train checkpoints; 0: about 20 per run
    amp: str = "bf16"  # autocast dtype on GPU: bf16, fp16 or none (CPU always runs float32)


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
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)

    @property
    def small_input(self) -> bool:
        return self.image_size <= 64

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that decides the synthetic images.

        Placement (workers, GPUs, address), the output path and post-training
        settings do not change which images a shard holds, so a run may be
        resumed with other resources or re-evaluated with another student.
        """
        d = self.to_dict()
        keep = {k: d[k] for k in ("dataset", "data_dir", "image_size", "arch", "width", "ipc", "method", "seed",
                                  "backbone", "squeeze", "recover")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Presets: the digits preset is sized so the whole pipeline runs on a laptop
# CPU in minutes (values chosen by measurement, see README); CIFAR and
# ImageFolder presets follow the authors' published settings (REFERENCE.md).
PRESETS: dict[str, dict] = {
    "digits": dict(
        image_size=16, arch="resnet18", width=0.25, ipc=10,
        squeeze=dict(epochs=40, batch_size=128, lr=0.1, weight_decay=5e-4, temperature=0.5,
                     crop_scale=(0.5, 1.0), flip=False, probe_epochs=100),
        recover=dict(iterations=500, lr=0.25, bn_coef=1.0, bn_weights="first:10", jitter=4,
                     crop_scale=(0.5, 1.0), flip=False, init="noise", classes_per_batch=10, grayscale=False),
        posttrain=dict(student="resnet18", student_width=0.25, epochs=200, batch_size=25, optimizer="adamw",
                       lr=2e-3, weight_decay=0.01, temperature=4.0, mix="cutmix", mix_prob=0.5,
                       crop_scale=(0.5, 1.0), flip=False),
    ),
    "cifar100": dict(
        image_size=32, arch="resnet18", width=1.0, ipc=50,
        squeeze=dict(epochs=200, batch_size=256, lr=0.06, temperature=0.5, crop_scale=(0.2, 1.0), flip=True),
        recover=dict(iterations=1000, lr=0.4, bn_coef=0.005, bn_weights="first:10", jitter=4, crop_scale=None,
                     flip=False, classes_per_batch=100),
        posttrain=dict(student="resnet18", student_width=1.0, epochs=200, batch_size=64, lr=1e-3,
                       weight_decay=0.01, temperature=30.0, mix="mixup", mix_prob=0.8, crop_scale=(0.08, 1.0)),
    ),
    "imagefolder": dict(
        image_size=224, arch="resnet50", width=1.0, ipc=50,
        squeeze=dict(epochs=200, batch_size=256, lr=0.03, temperature=0.2, crop_scale=(0.08, 1.0), flip=True),
        recover=dict(iterations=1000, lr=0.1, bn_coef=0.01, bn_weights="first:10", jitter=32,
                     crop_scale=(0.08, 1.0), flip=True, classes_per_batch=50),
        posttrain=dict(student="resnet18", student_width=1.0, epochs=300, batch_size=64, lr=1e-3,
                       weight_decay=0.01, temperature=20.0, mix="cutmix", mix_prob=1.0, crop_scale=(0.08, 1.0)),
    ),
    "synthetic": dict(
        image_size=16, arch="resnet18", width=0.125, ipc=2,
        squeeze=dict(epochs=2, batch_size=32, lr=0.05, crop_scale=(0.5, 1.0), flip=False, probe_epochs=20),
        recover=dict(iterations=5, lr=0.1, bn_coef=0.1, jitter=2, crop_scale=(0.5, 1.0), classes_per_batch=4),
        posttrain=dict(student="resnet18", student_width=0.125, epochs=2, batch_size=8, temperature=4.0,
                       crop_scale=(0.5, 1.0), flip=False),
    ),
}
# CIFAR-10 follows the CIFAR-100 recipe; a batch holds all (10) classes of one IPC index.
PRESETS["cifar10"] = {**PRESETS["cifar100"],
                      "recover": {**PRESETS["cifar100"]["recover"], "classes_per_batch": 10}}

# Flag names of every field, for error messages that point at what to change.
FLAGS = {
    "dataset": "--dataset", "out": "--out", "data_dir": "--data-dir", "image_size": "--image-size",
    "arch": "--arch", "width": "--width", "ipc": "--ipc", "method": "--method", "seed": "--seed",
    "backbone": "--backbone", "teacher": "--teacher", "num_gpus": "--num-gpus", "num_workers": "--num-workers",
    "address": "--address", "posttrain_workers": "--posttrain-workers",
    "squeeze.method": "--ssl", "squeeze.epochs": "--squeeze-epochs", "squeeze.batch_size": "--squeeze-batch-size",
    "squeeze.lr": "--squeeze-lr", "squeeze.temperature": "--ssl-temperature",
    "recover.iterations": "--iterations", "recover.lr": "--lr", "recover.bn_coef": "--bn-coef",
    "recover.bn_weights": "--bn-weights", "recover.jitter": "--jitter", "recover.init": "--init",
    "recover.classes_per_batch": "--classes-per-batch", "recover.grayscale": "--grayscale",
    "recover.bn_normalize": "--bn-normalize",
    "recover.crop_scale": "--recover-crop-scale",
    "posttrain.student": "--student", "posttrain.student_width": "--student-width",
    "posttrain.epochs": "--posttrain-epochs", "posttrain.batch_size": "--posttrain-batch-size",
    "posttrain.lr": "--posttrain-lr", "posttrain.temperature": "--temperature", "posttrain.mix": "--mix",
    "posttrain.optimizer": "--posttrain-optimizer", "posttrain.eval_every": "--eval-every",
    "posttrain.checkpoint_every": "--checkpoint-every",
}


def _flag(key: str) -> str:
    return FLAGS.get(key, "--" + key.split(".")[-1].replace("_", "-"))


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(_flag(key), message)


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
    _check(isinstance(name, str) and (name in ARCHS or (name.startswith("timm:") and len(name) > 5)), key,
           f"unknown arch {name!r} (choose from {', '.join(ARCHS)} or timm:<name>)")


def recovery_grid_problem(archs, methods) -> tuple[str, str] | None:
    """The first problem with lists of recovery archs and methods, as ("archs" | "methods", message).

    Shared by the tune YAML (`archs:`, `methods:`) and `bench models`
    (`--archs`, `--methods`), which each name the field their own way; None
    when both lists are valid.
    """
    if not isinstance(archs, list) or not archs:
        return "archs", f"must name at least one arch (got {archs!r})"
    for name in archs:
        try:
            validate_arch(name, "arch")
        except ConfigError as e:
            return "archs", str(e).split(": ", 1)[1]
    if not isinstance(methods, list) or not methods or any(m not in RECOVERY_METHODS for m in methods):
        return "methods", f"must name one or more of {', '.join(RECOVERY_METHODS)} (got {methods!r})"
    return None


def validate_squeeze(s: SqueezeConfig) -> None:
    _choice(s.method, SQUEEZE_METHODS, "squeeze.method")
    for k in ("epochs", "batch_size", "probe_epochs"):
        _positive_int(getattr(s, k), f"squeeze.{k}")
    _positive_float(s.lr, "squeeze.lr")
    _nonneg_float(s.weight_decay, "squeeze.weight_decay")
    _positive_float(s.temperature, "squeeze.temperature")
    _scale(s.crop_scale, "squeeze.crop_scale")


def validate_recover(r: RecoverConfig) -> None:
    from .bn import parse_bn_weights  # the weight-spec grammar lives with the maths

    _positive_int(r.iterations, "recover.iterations")
    _positive_float(r.lr, "recover.lr")
    _nonneg_float(r.bn_coef, "recover.bn_coef")
    try:
        parse_bn_weights(r.bn_weights)
    except ValueError as e:
        raise ConfigError(_flag("recover.bn_weights"), str(e)) from None
    _check(isinstance(r.jitter, int) and r.jitter >= 0, "recover.jitter",
           f"must be a non-negative integer (got {r.jitter!r})")
    _scale(r.crop_scale, "recover.crop_scale", allow_none=True)
    _choice(r.init, INITS, "recover.init")
    _positive_int(r.classes_per_batch, "recover.classes_per_batch")
    _choice(r.bn_normalize, BN_NORMALIZE, "recover.bn_normalize")
    _check(isinstance(r.grayscale, bool), "recover.grayscale", f"must be true or false (got {r.grayscale!r})")


def validate_posttrain(p: PosttrainConfig) -> None:
    validate_arch(p.student, "posttrain.student")
    _positive_float(p.student_width, "posttrain.student_width")
    for k in ("epochs", "batch_size"):
        _positive_int(getattr(p, k), f"posttrain.{k}")
    _choice(p.optimizer, OPTIMIZERS, "posttrain.optimizer")
    _positive_float(p.lr, "posttrain.lr")
    _nonneg_float(p.weight_decay, "posttrain.weight_decay")
    _positive_float(p.temperature, "posttrain.temperature")
    _choice(p.mix, MIXES, "posttrain.mix")
    _check(0 <= p.mix_prob <= 1, "posttrain.mix_prob", f"must be in [0, 1] (got {p.mix_prob!r})")
    _scale(p.crop_scale, "posttrain.crop_scale")
    _check(isinstance(p.eval_every, int) and p.eval_every >= 0, "posttrain.eval_every",
           f"must be a non-negative integer (got {p.eval_every!r})")
    _check(isinstance(p.checkpoint_every, int) and p.checkpoint_every >= 0, "posttrain.checkpoint_every",
           f"must be a non-negative integer (got {p.checkpoint_every!r})")
    _choice(p.amp, AMPS, "posttrain.amp")


def validate(cfg: DistillConfig) -> None:
    _choice(cfg.dataset, DATASETS, "dataset")
    _check(bool(cfg.out), "out", "is required")
    _positive_int(cfg.image_size, "image_size")
    _check(cfg.image_size >= 8, "image_size", f"must be at least 8 (got {cfg.image_size})")
    validate_arch(cfg.arch, "arch")
    _positive_float(cfg.width, "width")
    _positive_int(cfg.ipc, "ipc")
    _choice(cfg.method, METHODS, "method")
    _check(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", f"must be a non-negative integer (got {cfg.seed!r})")
    _check(isinstance(cfg.num_gpus, int) and cfg.num_gpus >= 0, "num_gpus",
           f"must be a non-negative integer (got {cfg.num_gpus!r})")
    if cfg.num_workers is not None:
        _positive_int(cfg.num_workers, "num_workers")
    _positive_int(cfg.posttrain_workers, "posttrain_workers")
    if cfg.method == "scdd":
        _check(cfg.squeeze.method in SSL_METHODS, "squeeze.method",
               f"--method scdd needs a self-supervised backbone (got {cfg.squeeze.method!r})")
    validate_squeeze(cfg.squeeze)
    validate_recover(cfg.recover)
    validate_posttrain(cfg.posttrain)


def _merge(base, overrides: dict, prefix: str):
    known = {f.name for f in dataclasses.fields(base)}
    for k in overrides:
        if k not in known:
            raise ConfigError(_flag(f"{prefix}{k}"), "is not a known setting")
    return dataclasses.replace(base, **overrides)


def build_distill_config(dataset: str, out: str, overrides: dict | None = None) -> DistillConfig:
    """Preset of `dataset`, then the user's overrides (None values ignored), validated.

    `overrides` holds only what the user set (a None value is taken as given,
    e.g. no random-resized-crop); it is flat for top-level fields and uses
    'squeeze.x', 'recover.x', 'posttrain.x' keys for the nested ones.
    """
    _choice(dataset, DATASETS, "dataset")
    preset = PRESETS[dataset]
    top = {k: v for k, v in preset.items() if k not in ("squeeze", "recover", "posttrain")}
    nested = {s: dict(preset.get(s, {})) for s in ("squeeze", "recover", "posttrain")}
    for k, v in (overrides or {}).items():
        if "." in k:
            section, name = k.split(".", 1)
            if section not in nested:
                raise ConfigError(_flag(k), "is not a known setting")
            nested[section][name] = v
        else:
            top[k] = v
    method = top.get("method", "scdd")
    # The backbone objective follows the method unless the user chose one.
    if method in ("sre2l", "random") and "squeeze.method" not in (overrides or {}):
        nested["squeeze"]["method"] = "supervised"
    cfg = DistillConfig(
        dataset=dataset, out=out,
        squeeze=_merge(SqueezeConfig(), nested["squeeze"], "squeeze."),
        recover=_merge(RecoverConfig(), nested["recover"], "recover."),
        posttrain=_merge(PosttrainConfig(), nested["posttrain"], "posttrain."),
        **_known_top(top),
    )
    validate(cfg)
    return cfg


def _known_top(top: dict) -> dict:
    known = {f.name for f in dataclasses.fields(DistillConfig)} - {"dataset", "out", "squeeze", "recover", "posttrain"}
    for k in top:
        if k not in known:
            raise ConfigError(_flag(k), "is not a known setting")
    return top


def parse_scale(text: str, flag: str) -> tuple[float, float] | None:
    """'0.08,1' -> (0.08, 1.0); 'none' -> None."""
    if text.strip().lower() == "none":
        return None
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*,\s*([0-9.eE+-]+)\s*", text)
    if not m:
        raise ConfigError(flag, f"expected LO,HI or none (got {text!r})")
    return float(m.group(1)), float(m.group(2))
