"""report.json and PNG grids."""
from __future__ import annotations

import io

import numpy as np
import torch

from .store import atomic_write_bytes, atomic_write_json

REQUIRED = ("method", "dataset", "arch", "width", "ipc", "num_classes", "num_images", "top1", "teacher_top1",
            "recover_seconds", "posttrain_seconds", "num_workers", "seed")


def write_report(path: str, report: dict) -> None:
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise ValueError(f"report lacks {', '.join(missing)}")
    atomic_write_json(path, report)


def save_grid(path: str, images: torch.Tensor, class_ids, class_names, max_classes: int = 10,
              max_per_class: int = 10) -> None:
    """One row per class (the first `max_classes`), up to `max_per_class` images each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    class_ids = np.asarray(class_ids)
    classes = sorted(set(class_ids.tolist()))[:max_classes]
    cols = min(max_per_class, max(int((class_ids == c).sum()) for c in classes))
    fig, axes = plt.subplots(len(classes), cols, figsize=(cols * 0.9 + 0.8, len(classes) * 0.9), squeeze=False)
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
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
