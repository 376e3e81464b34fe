"""The `squeeze` command: train a backbone (SSL + linear probe, or supervised),
or fit only the linear head of a public SSL checkpoint, and save it."""
from __future__ import annotations

import torch

from ..config import build_squeeze_setup
from ..core.evaluation import top1
from ..data import load_split
from ..errors import ConfigError
from ..models import save_checkpoint
from ..backbones import load_checkpoint_arg, probe, squeeze_and_save

SPLITS = ("train", "train-noval")


def run_squeeze(dataset: str, method: str, out: str, *, overrides: dict, data_dir: str | None = None,
                split: str = "train", seed: int = 0, from_checkpoint: str | None = None,
                use_gpu: bool = False) -> dict:
    """Write the backbone to `out`; returns its summary (arch, width, method, test top-1)."""
    setup = build_squeeze_setup(dataset, method, overrides)
    if split not in SPLITS:
        raise ConfigError("split", f"must be train or train-noval (got {split!r})")
    train = load_split(dataset, split, data_dir, setup.image_size)
    test = load_split(dataset, "test", data_dir, setup.image_size)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    info = train.info
    if not from_checkpoint:
        ckpt = squeeze_and_save(out, setup, train, device, seed, test, meta={"split": split})
        return {"out": out, "method": ckpt.method, "arch": ckpt.arch, "width": ckpt.width,
                "test_top1": round(ckpt.meta["test_top1"], 3)}
    # import + linear probe only: the SSL BN statistics stay as published
    ckpt = load_checkpoint_arg(from_checkpoint, "from_checkpoint", info, setup.image_size, allow_probe=True)
    asked_width = overrides.get("width")
    if overrides.get("arch") and (ckpt.arch != overrides["arch"]
                                  or (asked_width is not None and abs(ckpt.width - asked_width) > 1e-9)):
        raise ConfigError("arch", f"{from_checkpoint} is a {ckpt.arch} width {ckpt.width:g} but `arch` "
                                  f"{overrides['arch']} `width` {setup.width:g} was asked for")
    model = probe(ckpt, train, setup.cfg, device, seed)
    acc = top1(model, test, info.mean, info.std, device)
    meta = {"dataset": dataset, "split": split, "seed": seed, "test_top1": acc,
            **{k: ckpt.meta[k] for k in ("imported_from", "layout")}}
    save_checkpoint(out, model, arch=ckpt.arch, width=ckpt.width, num_classes=info.num_classes,
                    image_size=setup.image_size, small_input=ckpt.small_input, mean=info.mean, std=info.std,
                    method=ckpt.method, meta=meta)
    return {"out": out, "method": ckpt.method, "arch": ckpt.arch, "width": ckpt.width, "test_top1": round(acc, 3)}
