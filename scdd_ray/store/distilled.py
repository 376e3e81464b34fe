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


def plan_problem(class_ids, ipc_indices, per_class: list[int]) -> tuple[str, str]:
    """(rows outside the plan, rows the plan has that are missing), each in words ('' when none).

    `per_class[c]` images of class c, at IPC indices 0..per_class[c]-1, make a run's plan: a row outside
    it is of another run (or another IPC), a missing one was not computed yet (an interrupted run).
    """
    have = set(zip((int(c) for c in class_ids), (int(i) for i in ipc_indices)))
    outside = sorted((c, i) for c, i in have if not (0 <= c < len(per_class) and 0 <= i < per_class[c]))
    missing = [(c, i) for c, n in enumerate(per_class) for i in range(n) if (c, i) not in have]
    said_outside = (f"{len(outside)} images outside its run's plan (first: class {outside[0][0]} IPC index "
                    f"{outside[0][1]}; the plan has {len(per_class)} classes, up to {max(per_class, default=0)} "
                    "a class)") if outside else ""
    said_missing = (f"{len(missing)} of the {sum(per_class)} images of its run's plan missing (first: class "
                    f"{missing[0][0]} IPC index {missing[0][1]})") if missing else ""
    return said_outside, said_missing

