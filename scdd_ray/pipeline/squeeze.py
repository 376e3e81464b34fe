"""The `squeeze` command: train a backbone (SSL + linear probe, or supervised),
or fit only the linear head of a public SSL checkpoint, and save it."""
from __future__ import annotations

import os

import torch

from ..config import build_squeeze_setup
from ..data import load_split
from ..errors import ConfigError
from ..models import Checkpoint, is_checkpoint
from ..backbones import load_checkpoint_arg, probe_and_save, squeeze_and_save
from .outdir import _check_creatable

SPLITS = ("train", "train-noval")


def run_squeeze(dataset: str, method: str, out: str, *, overrides: dict, data_dir: str | None = None,
                split: str = "train", seed: int = 0, from_checkpoint: str | None = None,
                use_gpu: bool = False, data_options: dict | None = None) -> dict:
    """Write the backbone to `out`; returns its summary (arch, width, method, test top-1)."""
    setup = build_squeeze_setup(dataset, method, overrides, data_dir, gpu=use_gpu)
    check_out_file(out)
    if split not in SPLITS:
        raise ConfigError("split", f"must be train or train-noval (got {split!r})")
    train = load_split(dataset, split, data_dir, setup.image_size, **(data_options or {}))
    test = load_split(dataset, "test", data_dir, setup.image_size, **(data_options or {}))
    if use_gpu and not torch.cuda.is_available():  # never a silent CPU run of a GPU job
        raise ConfigError("num_gpus", f"asked for a GPU but torch {torch.__version__} sees no CUDA device")
    device = torch.device("cuda" if use_gpu else "cpu")
    info = train.info
    if not from_checkpoint:
        return _summary(out, squeeze_and_save(out, setup, train, device, seed, test, meta={"split": split}))
    # import + linear probe only: the SSL BN statistics stay as published
    ckpt = load_checkpoint_arg(from_checkpoint, "from_checkpoint", info, setup.image_size, allow_probe=True)
    asked_width = overrides.get("width")
    if overrides.get("arch") and (ckpt.arch != overrides["arch"]
                                  or (asked_width is not None and abs(ckpt.width - asked_width) > 1e-9)):
        raise ConfigError("arch", f"{from_checkpoint} is a {ckpt.arch} width {ckpt.width:g} but `arch` "
                                  f"{overrides['arch']} `width` {setup.width:g} was asked for")
    meta = {"dataset": dataset, "split": split, **{k: ckpt.meta[k] for k in ("imported_from", "layout")}}
    return _summary(out, probe_and_save(out, ckpt, train, test, setup.cfg, device, seed, setup.image_size, meta))


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
