"""Distilled sets side by side: one row per class, a block of images per set (scdd, sre2l, random, ...).

    python benchmarks/image_grid.py --per-class 3 --out benchmarks/results/cifar10_images.png \\
        scdd=runs/c10-scdd sre2l=runs/c10-sre2l random=runs/c10-random

Each NAME=DIR is a `distill --out DIR` (its `distilled/` shards are read and checked, class names come
from its `hf/` export) or any directory `scdd-ray posttrain --distilled` accepts. The first `--per-class`
images of each class (IPC indices 0, 1, ...) are shown, at their stored size, without interpolation.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scdd_ray.store.atomic import atomic_write_bytes  # noqa: E402
from scdd_ray.store.distilled import read_distilled  # noqa: E402


def class_names(run_dir: str, n: int) -> list[str]:
    """The names `distill` stored with its Hugging Face export, else the class indices."""
    hf = os.path.join(run_dir, "hf")
    files = sorted(f for f in os.listdir(hf) if f.endswith(".parquet")) if os.path.isdir(hf) else []
    meta = (pq.read_schema(os.path.join(hf, files[0])).metadata or {}) if files else {}
    names = json.loads(meta[b"classes"]) if b"classes" in meta else []
    return names if len(names) == n else [str(c) for c in range(n)]


def load(run_dir: str):
    root = os.path.join(run_dir, "distilled") if os.path.isdir(os.path.join(run_dir, "distilled")) else run_dir
    images, class_ids, _ = read_distilled(root)
    return images, np.asarray(class_ids)


def draw(sets: list[tuple[str, object, np.ndarray]], names: list[str], per_class: int) -> bytes:
    classes = sorted(set().union(*(set(c.tolist()) for _, _, c in sets)))
    cols = len(sets) * per_class + (len(sets) - 1)  # one blank column between sets
    fig = Figure(figsize=(cols * 0.62 + 0.9, len(classes) * 0.62 + 0.3))
    axes = fig.subplots(len(classes), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for s, (label, images, class_ids) in enumerate(sets):
        first = s * (per_class + 1)
        axes[0][first + (per_class - 1) // 2].set_title(label, fontsize=9, loc="left" if per_class % 2 else "right")
        for r, c in enumerate(classes):
            for k, i in enumerate(np.flatnonzero(class_ids == c)[:per_class]):
                axes[r][first + k].imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
    for r, c in enumerate(classes):
        axes[r][0].text(-0.15, 0.5, names[c][:10], transform=axes[r][0].transAxes, ha="right", va="center",
                        fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.995, bottom=0.005, top=0.95, wspace=0.05, hspace=0.05)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    rgb = io.BytesIO()  # no alpha channel: a quarter fewer bytes for noise-like images that barely compress
    Image.open(io.BytesIO(buf.getvalue())).convert("RGB").save(rgb, format="PNG", optimize=True)
    return rgb.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sets", nargs="+", metavar="NAME=DIR")
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sets, names = [], None
    for item in a.sets:
        label, sep, path = item.partition("=")
        if not sep:
            ap.error(f"expected NAME=DIR, got {item!r}")
        images, class_ids = load(path)
        sets.append((label, images, class_ids))
        names = names or class_names(path, int(class_ids.max()) + 1)
    atomic_write_bytes(a.out, draw(sets, names, a.per_class))
    print(f"wrote {a.out} ({os.path.getsize(a.out) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
