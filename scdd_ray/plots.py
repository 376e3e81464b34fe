"""The pictures runs draw: a grid of distilled images (one row per class), BN-statistic spreads per layer.

matplotlib's Figure only, no pyplot: no global backend or figure state."""
from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.figure import Figure

from .store.atomic import atomic_write_bytes


def save_grid(path: str, images: torch.Tensor, class_ids, class_names, max_classes: int = 10,
              max_per_class: int = 10) -> None:
    """One row per class (the first `max_classes`), up to `max_per_class` images each."""
    class_ids = np.asarray(class_ids)
    classes = sorted(set(class_ids.tolist()))[:max_classes]
    cols = min(max_per_class, max(int((class_ids == c).sum()) for c in classes))
    fig = Figure(figsize=(cols * 0.9 + 0.8, len(classes) * 0.9))
    axes = fig.subplots(len(classes), cols, squeeze=False)
    for r, c in enumerate(classes):
        idx = np.flatnonzero(class_ids == c)[:cols]
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if k < len(idx):
                ax.imshow(images[idx[k]].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[r][0].set_ylabel(str(class_names[c])[:12], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(path, buf.getvalue())


def plot_bn(path: str, groups: list[dict]) -> None:
    """Per-layer BN-statistic spread of one or more backbone groups, side by side.

    Each group is {"label": str, "runs": [bn_statistics rows, ...]}; a line is
    the mean over its runs (e.g. seeds) with a +-1 std band.
    """
    panels = (("mean_variance", "across-channel variance of running_mean", True),
              ("var_variance", "across-channel variance of running_var", True),
              ("mean_entropy", "entropy of running_mean (nats)", False),
              ("var_entropy", "entropy of running_var (nats)", False))
    fig = Figure(figsize=(10, 6.5))
    axes = fig.subplots(2, 2)
    for ax, (key, title, log_y) in zip(axes.flat, panels):
        positive = False
        for grp in groups:
            vals = np.array([[np.nan if row[key] is None else row[key] for row in run] for run in grp["runs"]],
                            dtype=float)
            mean, std = vals.mean(axis=0), vals.std(axis=0)
            positive = positive or bool(np.nanmax(mean, initial=0.0) > 0)
            layers = np.arange(vals.shape[1])
            ax.plot(layers, mean, marker="o", ms=3, label=f"{grp['label']} (n={len(vals)})")
            if len(vals) > 1:
                ax.fill_between(layers, mean - std, mean + std, alpha=0.25)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("BatchNorm layer (model order)", fontsize=9)
        if log_y and positive:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(path, buf.getvalue())
