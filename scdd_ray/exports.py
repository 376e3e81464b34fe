"""What `distill` writes from a finished distilled set besides its shards, by name.

An exporter is `fn(out_dir, images, class_ids, ipc_indices, class_names)`
(uint8 NCHW images sorted by class then IPC index). To add an output format:
one function decorated with `@exporter("name")` in this file, plus its test.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from .report import save_grid
from .store import export_imagefolder

Exporter = Callable[[str, torch.Tensor, np.ndarray, np.ndarray, tuple], None]
EXPORTERS: dict[str, Exporter] = {}


def exporter(name: str) -> Callable[[Exporter], Exporter]:
    def add(fn: Exporter) -> Exporter:
        if name in EXPORTERS:
            raise ValueError(f"exporter {name!r} is registered twice")
        EXPORTERS[name] = fn
        return fn
    return add


@exporter("imagefolder")
def imagefolder(out: str, images, class_ids, ipc_indices, class_names) -> None:
    """OUT/images/new{c:03d}/class{c:03d}_id{i:03d}.png: the reference implementation's layout."""
    export_imagefolder(os.path.join(out, "images"), images, class_ids, ipc_indices)


@exporter("grid")
def grid(out: str, images, class_ids, ipc_indices, class_names) -> None:
    """OUT/grid.png: one row per class."""
    save_grid(os.path.join(out, "grid.png"), images, class_ids, class_names)


def export_all(out: str, images: torch.Tensor, class_ids, ipc_indices, class_names) -> None:
    for fn in EXPORTERS.values():
        fn(out, images, class_ids, ipc_indices, class_names)
