"""Backbones and teachers: read the ones users name, squeeze the ones they do not, cache both.

One place trains a backbone and saves it with what rebuilding and feeding it
needs (`squeeze_and_save`), and one names the cached files (`backbone_name`),
for distill, squeeze and Tune alike.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
import torch.nn as nn

from .config import DistillConfig, SqueezeSetup
from .core.configs import SqueezeConfig
from .core.evaluation import top1
from .core.squeeze import linear_probe, squeeze
from .data import DatasetInfo, ImageSet
from .errors import CheckpointError, ConfigError, Diverged, NotOurCheckpoint
from .models import (Checkpoint, import_backbone, load_checkpoint, model_from_import, nonfinite_weights,
                     save_checkpoint)

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


def backbone_name(squeeze_method: str, arch: str, width: float, image_size: int, epochs: int, seed: int,
                  split: str = "train") -> str:
    """File name of a cached squeezed backbone; the split is named when it is not the whole train split."""
    return f"{squeeze_method}-{arch}-w{width:g}-s{image_size}-e{epochs}-seed{seed}{_split_suffix(split)}.pt"


def _split_suffix(split: str) -> str:
    """What a cached model's file name adds for the split it was trained on (nothing for all of train)."""
    return "" if split == "train" else f"-{split}"


def distill_backbone_name(cfg: DistillConfig, squeeze_method: str | None = None) -> str:
    """File name under OUT/backbones/ of the backbone `distill` squeezes for `cfg`."""
    return backbone_name(squeeze_method or cfg.squeeze.method, cfg.arch, cfg.width, cfg.image_size,
                         cfg.squeeze.epochs, cfg.seed, cfg.train_split)


def squeeze_and_save(path: str, setup: SqueezeSetup, train: ImageSet, device, seed: int,
                     test: ImageSet | None = None, meta: dict | None = None) -> Checkpoint:
    """Train `setup`'s backbone on `train`, measure it on `test` (if given) and save it at `path`."""
    t0 = time.perf_counter()
    model = squeeze(train, setup.arch, setup.width, setup.cfg, device=device, seed=seed,
                    small_input=setup.small_input)
    info = train.info
    _check_trained(model, f"squeeze ({setup.cfg.method})", "`squeeze.lr`")
    extra = {"dataset": setup.dataset, "epochs": setup.cfg.epochs, "seed": seed}
    if test is not None:
        acc = top1(model, test, info.mean, info.std, device)
        extra.update(test_top1=acc, seconds=time.perf_counter() - t0)
        log.info("squeeze %s: %.0fs, held-out top-1 %.2f%%", setup.cfg.method, extra["seconds"], acc)
    save_checkpoint(path, model, arch=setup.arch, width=setup.width, num_classes=info.num_classes,
                    image_size=setup.image_size, small_input=setup.small_input, mean=info.mean, std=info.std,
                    method=setup.cfg.method, meta={**extra, **(meta or {})})
    return load_checkpoint(path)


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
    log.info("using cached backbone %s", path)
    return ckpt


def get_backbone(cfg: DistillConfig, info: DatasetInfo, squeeze_method: str, device) -> tuple[Checkpoint, str]:
    """Load the cached backbone for `squeeze_method`, or train and cache it under OUT/backbones/."""
    path = os.path.join(cfg.out, "backbones", distill_backbone_name(cfg, squeeze_method))
    cached = _cached(path)
    if cached is not None:
        return cached, path
    setup = SqueezeSetup(cfg.dataset, cfg.arch, cfg.width, cfg.image_size,
                         dataclasses.replace(cfg.squeeze, method=squeeze_method))
    train = cfg.split("train")
    test = cfg.split("test")
    return squeeze_and_save(path, setup, train, device, cfg.seed, test), path


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
    """Fit the linear head of an imported SSL backbone; cached under OUT/backbones/."""
    src = os.path.splitext(os.path.basename(ckpt.meta["imported_from"]))[0]
    name = (f"probe-{ckpt.method}-{src}-{ckpt.arch}-s{cfg.image_size}-p{cfg.squeeze.probe_epochs}-seed{cfg.seed}"
            f"{_split_suffix(cfg.train_split)}.pt")
    path = os.path.join(cfg.out, "backbones", name)
    cached = _cached(path)
    if cached is not None:
        return cached, path
    train = cfg.split("train")
    test = cfg.split("test")
    meta = {**ckpt.meta, "needs_probe": False, "dataset": cfg.dataset, "probe_epochs": cfg.squeeze.probe_epochs}
    return probe_and_save(path, ckpt, train, test, cfg.squeeze, device, cfg.seed, cfg.image_size, meta), path
