"""The `squeeze` command: train a backbone (SSL + linear probe, or supervised),
or fit only the linear head of a public SSL checkpoint, and save it."""
from __future__ import annotations

import os

import torch

from ..backbones import load_checkpoint_arg, probe_and_save, squeeze_and_save
from ..config import validate_squeeze
from ..errors import ConfigError
from ..models.checkpoint import Checkpoint, is_checkpoint
from ..schema import DistillConfig
from .outdir import _check_creatable


def run_squeeze(cfg: DistillConfig, out: str, from_checkpoint: str | None = None) -> dict:
    """Write `cfg`'s backbone (arch, width, image size, `squeeze` settings, seed; on train less the validation
    share under `holdout`) to `out`; returns its summary (arch, width, method, held-out top-1)."""
    validate_squeeze(cfg.squeeze)
    if not out:
        raise ConfigError("out", "is required")
    check_out_file(out)
    use_gpu = cfg.num_gpus > 0
    if use_gpu and not torch.cuda.is_available():  # never a silent CPU run of a GPU job
        raise ConfigError("num_gpus", f"asked for a GPU but torch {torch.__version__} sees no CUDA device")
    train, test = cfg.split("train"), cfg.split("test")
    device = torch.device("cuda" if use_gpu else "cpu")
    if not from_checkpoint:
        return _summary(out, squeeze_and_save(out, cfg, train, device, test))
    # import + linear probe only: the SSL BN statistics stay as published
    ckpt = load_checkpoint_arg(from_checkpoint, "from_checkpoint", train.info, cfg.image_size, allow_probe=True)
    if ckpt.arch != cfg.arch or abs(ckpt.width - cfg.width) > 1e-9:  # the configuration names what is probed
        raise ConfigError("arch", f"{from_checkpoint} is a {ckpt.arch} width {ckpt.width:g} but `arch` {cfg.arch} "
                                  f"`width` {cfg.width:g} was asked for")
    meta = {"dataset": cfg.dataset, "split": cfg.train_split, **{k: ckpt.meta[k] for k in ("imported_from", "layout")}}
    return _summary(out, probe_and_save(out, ckpt, train, test, cfg.squeeze, device, cfg.seed, cfg.image_size, meta))


def check_out_file(out: str, field: str = "out") -> None:
    """`out` may be written: a new path, or a checkpoint of ours (replaced); never a directory or a file that
    is not ours. Checked before any training."""
    if os.path.isdir(out):
        raise ConfigError(field, f"{out} is a directory; give the checkpoint's file path (.pt)")
    if not os.path.lexists(out):
        _check_creatable(out, field)
    elif not is_checkpoint(out):
        raise ConfigError(field, f"{out} exists and is not an scdd-ray checkpoint; it is not replaced (choose "
                                 "another path, or remove it)")


def _summary(out: str, ckpt: Checkpoint) -> dict:
    return {"out": out, "method": ckpt.method, "arch": ckpt.arch, "width": ckpt.width,
            "test_top1": round(ckpt.meta["test_top1"], 3)}
