"""What `distill` writes from a finished distilled set besides its shards, by name.

An exporter is `fn(out_dir, images, class_ids, ipc_indices, class_names)`
(uint8 NCHW images sorted by class then IPC index). To add an output format:
one function decorated with `@exporter("name")` in this file, plus its test.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .plots import save_grid
from .store.atomic import atomic_write_bytes
from .store.png import encode_png

Exporter = Callable[[str, torch.Tensor, np.ndarray, np.ndarray, tuple], None]
EXPORTERS: dict[str, Exporter] = {}


def exporter(name: str) -> Callable[[Exporter], Exporter]:
    def add(fn: Exporter) -> Exporter:
        if name in EXPORTERS:
            raise ValueError(f"exporter {name!r} is registered twice")
        EXPORTERS[name] = fn
        return fn
    return add


def export_imagefolder(root: str, images: torch.Tensor, class_ids, ipc_indices) -> None:
    """images/new{class:03d}/class{class:03d}_id{ipc:03d}.png, as the reference code lays out."""
    for img, c, i in zip(images, class_ids, ipc_indices):
        path = os.path.join(root, f"new{int(c):03d}", f"class{int(c):03d}_id{int(i):03d}.png")
        atomic_write_bytes(path, encode_png(img))


@exporter("imagefolder")
def imagefolder(out: str, images, class_ids, ipc_indices, class_names) -> None:
    """OUT/images/new{c:03d}/class{c:03d}_id{i:03d}.png: the reference implementation's layout."""
    export_imagefolder(os.path.join(out, "images"), images, class_ids, ipc_indices)


@exporter("grid")
def grid(out: str, images, class_ids, ipc_indices, class_names) -> None:
    """OUT/grid.png: one row per class."""
    save_grid(os.path.join(out, "grid.png"), images, class_ids, class_names)


HF_FILE = os.path.join("hf", "train-00000-of-00001.parquet")


def hf_table(images: torch.Tensor, class_ids, ipc_indices, class_names) -> pa.Table:
    """The distilled set as a Hugging Face image-classification table: `image` {bytes, path} + `label`.

    Class names go into the schema metadata twice: as `classes` (a JSON list)
    and as the `datasets` library's own features record, so `datasets`,
    pandas, Ray Data and our `parquet` dataset all read the set as it is.
    """
    names = [str(n) for n in class_names]
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    meta = {"classes": json.dumps(names), "huggingface": json.dumps({"info": {"features": features}})}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": encode_png(img), "path": f"class{int(c):03d}_id{int(i):03d}.png"}
            for img, c, i in zip(images, class_ids, ipc_indices)]
    return pa.table({"image": pa.array(rows, image_type),
                     "label": pa.array([int(c) for c in class_ids], pa.int64())}).replace_schema_metadata(meta)


@exporter("hf_parquet")
def hf_parquet(out: str, images, class_ids, ipc_indices, class_names) -> None:
    """OUT/hf/train-00000-of-00001.parquet (see `hf_table`)."""
    buf = pa.BufferOutputStream()
    pq.write_table(hf_table(images, class_ids, ipc_indices, class_names), buf)
    atomic_write_bytes(os.path.join(out, HF_FILE), buf.getvalue().to_pybytes())


def export_all(out: str, images: torch.Tensor, class_ids, ipc_indices, class_names) -> None:
    for fn in EXPORTERS.values():
        fn(out, images, class_ids, ipc_indices, class_names)
