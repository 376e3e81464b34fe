"""Reading any distilled set a user points at: a distill output's shards, bare Parquet files, or the
reference ImageFolder layout, all in (class, ipc index) order."""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from ..errors import StoreError
from .encoded import EncodedImages, imagefolder_encoded, parquet_encoded
from .shards import ShardStore


def find_distilled(root: str) -> tuple[str, list[str]]:
    """What `root` holds: ('shards', files) for a manifest, ('parquet', files) for bare *.parquet
    files, ('imagefolder', []) for the reference layout; StoreError when it holds no images."""
    if not os.path.isdir(root):
        raise StoreError(f"{root} is not a directory")
    store = ShardStore(root)
    if store.exists():
        files = store.files()
        if not files:
            raise StoreError(f"{root} has no finished shards (its manifest lists none)")
        store.verify()
        return "shards", files
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".parquet"))
    if files:
        return "parquet", files
    if any(re.fullmatch(r"new\d+", d) for d in os.listdir(root)):
        return "imagefolder", []
    raise StoreError(f"{root} holds no distilled images: expected manifest.json + shard-*.parquet (a distill "
                     "output), *.parquet files, or new<class>/class<c>_id<i>.png folders")


def read_distilled(root: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """uint8 images, class ids and ipc indices of a distilled set, sorted by (class_id, ipc_index)."""
    return read_encoded(root).decode_all()


def read_encoded(root: str) -> EncodedImages:
    """A distilled set as `read_distilled` orders it, still encoded (decoded per batch by its user)."""
    kind, files = find_distilled(root)
    if kind == "imagefolder":
        return imagefolder_encoded(root).sorted()
    return parquet_encoded(files, root)
