"""Stored soft labels: one Parquet file per (epoch, writer rank), one row per crop with what rebuilds the
crop (image, random-resized-crop box, flip, mixing partner and box/weight) and the teacher's top-k
probabilities on it."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StoreError
from .atomic import atomic_write_bytes

SOFT_META = "soft_labels.json"

SOFT_FORMAT = "scdd-ray-soft-labels/1"


def soft_label_schema(k: int) -> pa.Schema:
    return pa.schema([
        ("epoch", pa.int32()), ("step", pa.int32()), ("slot", pa.int32()), ("image", pa.int32()),
        ("box_w", pa.float32()), ("box_h", pa.float32()), ("box_cx", pa.float32()), ("box_cy", pa.float32()),
        ("flip", pa.bool_()), ("mix", pa.int8()), ("partner", pa.int32()),
        ("cut_y0", pa.int16()), ("cut_y1", pa.int16()), ("cut_x0", pa.int16()), ("cut_x1", pa.int16()),
        ("lam", pa.float32()),
        ("topk_index", pa.list_(pa.int16(), k)), ("topk_prob", pa.list_(pa.float16(), k)),
    ])


def soft_label_file(root: str, epoch: int, rank: int) -> str:
    return os.path.join(root, f"epoch-{epoch:05d}-rank-{rank:03d}.parquet")


def write_soft_labels(root: str, epoch: int, rank: int, columns: dict, k: int) -> None:
    """Write one epoch's rows of one writer atomically (columns: name -> numpy array)."""
    cols = {}
    for f in soft_label_schema(k):
        v = columns[f.name]
        if pa.types.is_fixed_size_list(f.type):
            flat = pa.array(np.ascontiguousarray(v).reshape(-1), f.type.value_type)
            cols[f.name] = pa.FixedSizeListArray.from_arrays(flat, k)
        else:
            cols[f.name] = pa.array(v, f.type)
    table = pa.table(cols, schema=soft_label_schema(k))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(soft_label_file(root, epoch, rank), buf.getvalue().to_pybytes())


def read_soft_labels(root: str, epoch: int) -> dict:
    """All rows of one epoch, sorted by (step, slot), as numpy arrays; StoreError if any is missing."""
    prefix = f"epoch-{epoch:05d}-rank-"
    files = sorted(f for f in os.listdir(root) if f.startswith(prefix) and f.endswith(".parquet"))
    if not files:
        raise StoreError(f"{root} has no stored soft labels for epoch {epoch + 1}")
    table = pa.concat_tables([pq.read_table(os.path.join(root, f)) for f in files])
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            k = col.type.list_size
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    order = np.lexsort((out["slot"], out["step"]))
    out = {k: v[order] for k, v in out.items()}
    key = out["step"].astype(np.int64) * (1 << 32) + out["slot"]
    if len(np.unique(key)) != len(key):
        raise StoreError(f"{root} holds duplicate crops for epoch {epoch + 1}")
    return out
