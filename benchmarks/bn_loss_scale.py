"""How the BN-matching loss scales with depth, for each `--bn-normalize` mode.

For resnet18/50/101 the BN running statistics are first set to those of real
digits images (a cumulative pass over the training split in train mode, no
parameter update), then the loss of a Gaussian-noise batch -- what recover
starts from -- is measured with the paper's sum over layers (`none`), the
mean over layers (`mean`) and the per-channel normalised mean (`channel`).
Weights and image size are the digits preset's (`first:10`, 16 px). No
training: this isolates how the sum over layers and the layers' widths and
activation scales inflate the term.

    python benchmarks/bn_loss_scale.py --widths 0.25,1 --md benchmarks/results/digits_bn_loss_scale.md
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from scdd_ray.core.augment import normalize, to_float
from scdd_ray.core.bn import bn_layers, bn_loss, parse_bn_weights
from scdd_ray.data import iterate, load_split
from scdd_ray.models.factory import create_model

from _recipe import add_recipe_args, recipe


@torch.no_grad()
def data_statistics(model: torch.nn.Module, train, batches: int) -> None:
    for layer in bn_layers(model):
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches seen
    model.train()
    g = torch.Generator().manual_seed(0)
    for i, (x, _) in enumerate(iterate(train, 128, shuffle=True, generator=g)):
        if i == batches:
            break
        model(normalize(to_float(x), train.info.mean, train.info.std))
    model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="0.25,1")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--md", required=True)
    add_recipe_args(ap, "digits")
    a = ap.parse_args()
    cfg = recipe(a)
    torch.manual_seed(0)
    train = load_split(cfg.dataset, "train", cfg.data_dir, cfg.image_size)
    noise = torch.randn(100, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    rows = ["| arch | width | BN layers | none (paper) | mean | channel |", "|---|---|---|---|---|---|"]
    for width in (float(w) for w in a.widths.split(",")):
        base = None
        for arch in ("resnet18", "resnet50", "resnet101"):
            torch.manual_seed(0)
            model = create_model(arch, train.info.num_classes, width, small_input=True)
            data_statistics(model, train, a.batches)
            w = parse_bn_weights(cfg.recover.bn_weights).resolve(len(bn_layers(model)))
            vals = [bn_loss(model, noise, w, mode).item() for mode in ("none", "mean", "channel")]
            base = base or vals
            cells = [f"{v:.3g} ({v / b:.1f}x)" for v, b in zip(vals, base)]
            rows.append(f"| {arch} | {width:g} | {len(w)} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    text = (f"BN loss of a N(0,1) noise batch (100 images, {cfg.image_size}x{cfg.image_size}) against BN "
            f"statistics of real {cfg.dataset}; ratio to resnet18 of the same width in brackets.\n"
            f"Command: python benchmarks/bn_loss_scale.py {' '.join(sys.argv[1:])}\n\n" + "\n".join(rows) + "\n")
    with open(a.md + ".tmp", "w") as f:
        f.write(text)
    os.replace(a.md + ".tmp", a.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
