"""Backbones and teachers: which a run uses, read the ones users name, squeeze the ones they do not, cache both.

`plan_models(cfg)` is the one decision, for every front end (`distill`,
`bench table`, `bench models`, `tune`), of a run's recovery backbone and
relabelling teacher: a checkpoint the user named, a cached file, or one to
squeeze, under which name in which cache (`models_dir`, by default
OUT/backbones) and on which split. `resolve_models` carries the plan out.
The teacher is one supervised model of the run's arch for every method
unless the configuration names one (or `backbone`), so scdd, sre2l and the
random subset of a table are relabelled alike.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import with_squeeze_method
from .core.configs import SUPERVISED, SqueezeConfig
from .core.evaluation import top1
from .core.squeeze import Resume, linear_probe, squeeze
from .data import DatasetInfo, ImageSet
from .errors import CheckpointError, ConfigError, Diverged, NotOurCheckpoint
from .locks import locked
from .models.checkpoint import Checkpoint, load_checkpoint, nonfinite_weights, save_checkpoint
from .models.public import import_backbone, model_from_import
from .schema import RESUME_SUFFIX, SQUEEZE_SAVE_EVERY_S, TEACHER_BACKBONE, DistillConfig, teacher_paths

log = logging.getLogger("scdd_ray")


def load_checkpoint_arg(path: str, field: str, info: DatasetInfo | None = None, image_size: int | None = None,
                        allow_probe: bool = False) -> Checkpoint:
    """Load a user-named checkpoint; failures become a ConfigError about `field`.

    With `info`, public checkpoints (torchvision, MoCo-v2/v3, DINO, SwAV) are
    imported too. One that lacks a classifier for the dataset's classes is
    returned with `meta["needs_probe"]` when `allow_probe`, else refused.
    """
    try:
        return load_checkpoint(path)
    except NotOurCheckpoint as e:
        if info is None:
            raise ConfigError(field, e.message) from None
    except CheckpointError as e:
        raise ConfigError(field, e.message) from None
    try:
        imp = import_backbone(path)
        model, has_head = model_from_import(imp, info.num_classes)
    except CheckpointError as e:
        raise ConfigError(field, e.message) from None
    if not has_head and not allow_probe:
        raise ConfigError(field, f"{path} ({imp.layout} layout) has no classifier for {info.num_classes} classes; "
                                 f"fit one first: squeeze {info.name} from it (a linear probe) and pass the result")
    return Checkpoint(arch=imp.arch, width=imp.width, num_classes=info.num_classes,
                      image_size=image_size or info.image_size, small_input=imp.small_input, mean=info.mean,
                      std=info.std, method=imp.layout, state_dict=model.state_dict(),
                      meta={"imported_from": os.path.abspath(path), "layout": imp.layout,
                            "dropped_keys": len(imp.dropped), "needs_probe": not has_head})


def load_any_backbone(path: str, field: str) -> tuple[nn.Module, str]:
    """(model, method) of our checkpoint or a public one, head or not (BN statistics need none)."""
    try:
        ckpt = load_checkpoint(path)
        return ckpt.build(), ckpt.method
    except NotOurCheckpoint:
        pass
    except CheckpointError as e:
        raise ConfigError(field, e.message) from None
    try:
        imp = import_backbone(path)
        return model_from_import(imp, 1 if imp.head is None else len(imp.head["bias"]))[0], imp.layout
    except CheckpointError as e:
        raise ConfigError(field, e.message) from None


def check_checkpoint(ckpt: Checkpoint, cfg: DistillConfig, info: DatasetInfo, field: str, path: str,
                     match_arch: bool) -> None:
    if ckpt.num_classes != info.num_classes:
        raise ConfigError(field, f"{path} has {ckpt.num_classes} classes but {cfg.dataset} has {info.num_classes}")
    if match_arch and (ckpt.arch != cfg.arch or abs(ckpt.width - cfg.width) > 1e-9):
        raise ConfigError(field, f"{path} is {ckpt.arch} width {ckpt.width} but `arch` {cfg.arch} "
                                 f"`width` {cfg.width} was asked for")
    if ckpt.image_size != cfg.image_size:
        raise ConfigError(field, f"{path} was trained at image size {ckpt.image_size}, this run uses "
                                 f"{cfg.image_size} (BN statistics depend on resolution)")


# --- cache names -----------------------------------------------------------------------------

def backbone_name(squeeze_method: str, arch: str, width: float, image_size: int, epochs: int, seed: int,
                  split: str = "train") -> str:
    """File name of a cached squeezed backbone; the split is named when it is not the whole train split."""
    return f"{squeeze_method}-{arch}-w{width:g}-s{image_size}-e{epochs}-seed{seed}{_split_suffix(split)}.pt"


def _split_suffix(split: str) -> str:
    """What a cached model's file name adds for the split it was trained on (nothing for all of train)."""
    return "" if split == "train" else f"-{split}"


def models_dir(cfg: DistillConfig) -> str:
    """Where `cfg`'s squeezed models are cached: `models_dir`, or the run's OUT/backbones."""
    return cfg.models_dir or os.path.join(cfg.out, "backbones")


def squeezed_path(cfg: DistillConfig) -> str:
    """The cache file of the model `cfg` squeezes (its `squeeze.method`, arch, width, size, epochs, seed, split)."""
    return os.path.join(models_dir(cfg), backbone_name(cfg.squeeze.method, cfg.arch, cfg.width, cfg.image_size,
                                                       cfg.squeeze.epochs, cfg.seed, cfg.train_split))


# --- the plan ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """Where one model of a run comes from: `path`, named by the user (`given`) or squeezed by `squeeze`
    (the configuration that trains it) when that file does not exist yet."""

    path: str
    given: bool
    squeeze: DistillConfig | None = None

    @property
    def missing(self) -> bool:
        return not self.given and not os.path.isfile(self.path)


@dataclass(frozen=True)
class ModelPlan:
    backbone: ModelSource | None  # None: the random subset recovers nothing
    teachers: tuple[ModelSource, ...]  # one (the backbone's own source when it relabels), or a committee

    @property
    def teacher(self) -> ModelSource:
        """The one teacher of a plan without a committee."""
        if len(self.teachers) != 1:
            raise ValueError("this run relabels with a committee of teachers: read `teachers`")
        return self.teachers[0]


def plan_models(cfg: DistillConfig) -> ModelPlan:
    """Which recovery backbone and relabelling teacher `cfg` uses, and where they are (or will be) on disk."""
    backbone = None
    if cfg.backbone:
        backbone = ModelSource(cfg.backbone, True)
    elif cfg.method != "random":
        backbone = ModelSource(squeezed_path(cfg), False, cfg)
    if cfg.teacher and cfg.teacher != TEACHER_BACKBONE:  # one path, or a committee of several
        return ModelPlan(backbone, tuple(ModelSource(p, True) for p in teacher_paths(cfg.teacher)))
    if cfg.teacher == TEACHER_BACKBONE or _relabels_itself(cfg, backbone):
        return ModelPlan(backbone, (backbone,))
    supervised = with_squeeze_method(cfg, SUPERVISED)
    return ModelPlan(backbone, (ModelSource(squeezed_path(supervised), False, supervised),))


def _relabels_itself(cfg: DistillConfig, src: ModelSource | None) -> bool:
    """A supervised recovery backbone of the run's arch (sre2l's) is the teacher already."""
    if src is None:
        return False
    if not src.given:
        return cfg.squeeze.method == SUPERVISED
    try:
        ckpt = load_checkpoint(src.path)
    except CheckpointError:  # a public checkpoint (or an unreadable file, refused when it is loaded)
        return False
    return ckpt.method == SUPERVISED and ckpt.arch == cfg.arch


@dataclass
class Models:
    backbone: Checkpoint | None
    backbone_path: str | None
    teacher: Checkpoint | tuple[Checkpoint, ...]  # a committee is a tuple (core.committee)
    teacher_path: str  # a committee's paths comma-separated, as `teacher` takes them


def resolve_models(cfg: DistillConfig, info: DatasetInfo, device, given: dict | None = None) -> Models:
    """Carry out `plan_models(cfg)`: load what exists, squeeze (and cache) what does not.

    `given`: checkpoints already loaded from the paths the user named (by
    path). A named backbone without a classifier (a public SSL checkpoint) is
    linear-probed here and the result cached beside the squeezed models.
    """
    plan, given = plan_models(cfg), dict(given or {})
    backbone = path = None
    if plan.backbone is not None:
        backbone, path = _materialize(plan.backbone, "backbone", cfg, info, device, given)
        if backbone.meta.get("needs_probe"):
            backbone, path = probe_backbone(cfg, info, backbone, device)
    if plan.teachers == (plan.backbone,):
        return Models(backbone, path, backbone, path)
    teachers = [_materialize(src, "teacher", cfg, info, device, given) for src in plan.teachers]
    if len(teachers) == 1:
        return Models(backbone, path, *teachers[0])
    return Models(backbone, path, tuple(c for c, _ in teachers), ",".join(p for _, p in teachers))


def _materialize(src: ModelSource, field: str, cfg: DistillConfig, info: DatasetInfo, device, given: dict
                 ) -> tuple[Checkpoint, str]:
    if src.given:
        if src.path not in given:
            given[src.path] = load_checkpoint_arg(src.path, field, info, cfg.image_size,
                                                  allow_probe=field == "backbone")
        return given[src.path], src.path
    return squeeze_cached(src, device), src.path


def squeeze_cached(src: ModelSource, device) -> Checkpoint:
    """The cached model of `src`, squeezed first if it is missing; one process squeezes it when several
    (bench parts, sweeps) need it at once. A cached file squeezed with other settings is refused."""
    locks = os.path.join(os.path.dirname(os.path.abspath(src.path)), ".locks")  # lock files out of sight
    os.makedirs(locks, exist_ok=True)
    with locked(os.path.join(locks, os.path.basename(src.path) + ".lock")):
        ckpt = _cached(src.path)
        if ckpt is not None:
            check_cached(ckpt, src)
            return ckpt
        cfg = src.squeeze
        return squeeze_and_save(src.path, cfg, cfg.split("train"), device, cfg.split("test"))


def check_cached(ckpt: Checkpoint, src: ModelSource) -> None:
    """A cached model is used only for the settings that squeezed it (what its metadata records)."""
    cfg, meta = src.squeeze, ckpt.meta
    want = {"dataset": cfg.dataset, "split": cfg.train_split, "seed": cfg.seed,
            "squeeze": _squeeze_record(cfg.squeeze)}
    for k, v in want.items():
        if k in meta and meta[k] != v and not (k == "split" and meta[k] is None):
            raise ConfigError("models_dir", f"{src.path} was squeezed with {k} {meta[k]!r}, this run needs {v!r}; "
                                            "use another `models_dir` or remove the file")


def _squeeze_record(s: SqueezeConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}


# --- squeezing -----------------------------------------------------------------------------------

def squeeze_and_save(path: str, cfg: DistillConfig, train: ImageSet, device, test: ImageSet | None = None,
                     meta: dict | None = None) -> Checkpoint:
    """Train `cfg`'s backbone (its arch, width, image size and squeeze settings, seed `cfg.seed`) on `train`,
    measure it on `test` (if given) and save it at `path` with the settings that made it."""
    t0 = time.perf_counter()
    info = train.info
    extra = {"dataset": cfg.dataset, "epochs": cfg.squeeze.epochs, "seed": cfg.seed, "split": cfg.train_split,
             "squeeze": _squeeze_record(cfg.squeeze)}
    resume = Resume(path + RESUME_SUFFIX, _resume_key(cfg, train, extra), SQUEEZE_SAVE_EVERY_S)
    model = squeeze(train, cfg.arch, cfg.width, cfg.squeeze, device=device, seed=cfg.seed,
                    small_input=cfg.small_input, resume=resume)
    _check_trained(model, f"squeeze ({cfg.squeeze.method})", "`squeeze.lr`")
    if test is not None:
        acc = top1(model, test, info.mean, info.std, device)
        extra.update(test_top1=acc, seconds=resume.before + time.perf_counter() - t0)  # earlier processes' too
        log.info("squeeze %s: %.0fs, held-out top-1 %.2f%%", cfg.squeeze.method, extra["seconds"], acc)
    save_checkpoint(path, model, arch=cfg.arch, width=cfg.width, num_classes=info.num_classes,
                    image_size=cfg.image_size, small_input=cfg.small_input, mean=info.mean, std=info.std,
                    method=cfg.squeeze.method, meta={**extra, **(meta or {})})
    resume.clear()  # only once the model is safely in place
    return load_checkpoint(path)


def _resume_key(cfg: DistillConfig, train: ImageSet, extra: dict) -> str:
    """Everything that makes a squeezed model, so that saved progress is only ever resumed by the same run."""
    made_of = {**extra, "arch": cfg.arch, "width": cfg.width, "image_size": cfg.image_size,
               "small_input": cfg.small_input, "num_classes": train.info.num_classes, "train_rows": len(train)}
    return json.dumps(made_of, sort_keys=True, default=str)


def _check_trained(model: nn.Module, stage: str, setting: str) -> None:
    """A model whose training diverged (NaN or infinite weights) is never saved: Diverged naming the stage."""
    problem = nonfinite_weights(model.state_dict())
    if problem:
        raise Diverged(f"{stage} stopped: {problem.split(' (')[0]}; lower {setting} or check the data")


def _cached(path: str) -> Checkpoint | None:
    """The cached model at `path`, or None (trained again) when there is none or it is damaged, as a damaged
    shard is computed again."""
    if not os.path.isfile(path):
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        log.warning("%s; training it again", e.message)
        return None
    log.info("using cached model %s", path)
    return ckpt


def probe(ckpt: Checkpoint, train: ImageSet, cfg: SqueezeConfig, device, seed: int) -> nn.Module:
    """The imported backbone with its linear head fitted on `train` (frozen, BN in eval mode)."""
    model = ckpt.build().to(device, memory_format=torch.channels_last)
    if ckpt.meta.get("needs_probe"):
        linear_probe(model, train, cfg, device, seed)
    return model


def probe_and_save(path: str, ckpt: Checkpoint, train: ImageSet, test: ImageSet, cfg: SqueezeConfig, device,
                   seed: int, image_size: int, meta: dict) -> Checkpoint:
    """Fit the head of an imported backbone on `train`, measure it on `test`, save it at `path`."""
    t0 = time.perf_counter()
    model = probe(ckpt, train, cfg, device, seed)
    _check_trained(model, "the linear probe", "`squeeze.lr`")
    info = train.info
    acc = top1(model, test, info.mean, info.std, device)
    log.info("linear probe on imported %s backbone: test top-1 %.2f%%", ckpt.method, acc)
    save_checkpoint(path, model, arch=ckpt.arch, width=ckpt.width, num_classes=info.num_classes,
                    image_size=image_size, small_input=ckpt.small_input, mean=info.mean, std=info.std,
                    method=ckpt.method, meta={**meta, "seed": seed, "test_top1": acc,
                                              "seconds": time.perf_counter() - t0})
    return load_checkpoint(path)


def probe_backbone(cfg: DistillConfig, info: DatasetInfo, ckpt: Checkpoint, device) -> tuple[Checkpoint, str]:
    """Fit the linear head of an imported SSL backbone; cached beside the run's squeezed models."""
    src = os.path.splitext(os.path.basename(ckpt.meta["imported_from"]))[0]
    name = (f"probe-{ckpt.method}-{src}-{ckpt.arch}-s{cfg.image_size}-p{cfg.squeeze.probe_epochs}-seed{cfg.seed}"
            f"{_split_suffix(cfg.train_split)}.pt")
    path = os.path.join(models_dir(cfg), name)
    cached = _cached(path)
    if cached is not None:
        return cached, path
    train = cfg.split("train")
    test = cfg.split("test")
    meta = {**ckpt.meta, "needs_probe": False, "dataset": cfg.dataset, "probe_epochs": cfg.squeeze.probe_epochs}
    return probe_and_save(path, ckpt, train, test, cfg.squeeze, device, cfg.seed, cfg.image_size, meta), path
