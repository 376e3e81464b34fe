"""CIFAR-10 / CIFAR-100 from a local directory, in either layout:

- the Hugging Face Parquet layout (DIR/train-*.parquet, DIR/test-*.parquet:
  `img` + `label` for CIFAR-10, `img` + `fine_label` for CIFAR-100), read by
  data/parquet.py, preferred: nothing in it can run code;
- the python-pickle layout (DIR/cifar-10-batches-py/, DIR/cifar-100-python/).
  Those files are unpickled, and unpickling runs whatever the file says: read
  only pickle files you trust.

The presets (presets/cifar100.yaml, cifar10-gpu.yaml, cifar10-cpu.yaml) follow
the authors' CIFAR-100 scripts; CIFAR-10 has a CPU preset (`num_gpus` 0) sized
to distil in well under an hour on 2 cores.
"""
from __future__ import annotations

import os
import pickle
from functools import lru_cache

import numpy as np
import torch

from ..errors import DataError
from .base import DatasetInfo, TensorImageSet, resize_u8
from .parquet import has_parquet_layout, load_parquet_sets
from .registry import DatasetSpec, register

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

LAYOUTS = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names="label_names", labels="labels", n=10,
                    mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     names="fine_label_names", labels="fine_labels", n=100, mean=CIFAR100_MEAN, std=CIFAR100_STD),
}


def cifar_root(name: str, data_dir: str) -> str:
    spec = LAYOUTS[name]
    if not data_dir:
        raise DataError(f"`data_dir` is required for {name}: a directory holding train-*.parquet and "
                        f"test-*.parquet, or {spec['folder']}/ (the python version); nothing is downloaded")
    if not os.path.isdir(data_dir):
        raise DataError(f"`data_dir` {data_dir} does not exist (expected a directory holding {spec['folder']}/)")
    for root in (os.path.join(data_dir, spec["folder"]), data_dir):
        if all(os.path.isfile(os.path.join(root, f)) for f in spec["train"] + spec["test"] + [spec["meta"]]):
            return root
    want = ", ".join(spec["train"] + spec["test"] + [spec["meta"]])
    raise DataError(f"`data_dir` {data_dir} has no {name} files: expected {spec['folder']}/ with {want} "
                    "(CIFAR python pickle layout), or train-*.parquet and test-*.parquet (Hugging Face layout)")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(e).__name__})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar_sets(name: str, data_dir: str, image_size: int) -> tuple[TensorImageSet, ...]:
    if has_parquet_layout(data_dir):
        spec = LAYOUTS[name]
        return load_parquet_sets(data_dir, image_size, name=name, mean=spec["mean"], std=spec["std"])
    return load_pickle_sets(name, data_dir, image_size)


@lru_cache(maxsize=4)
def load_pickle_sets(name: str, data_dir: str, image_size: int) -> tuple[TensorImageSet, TensorImageSet]:
    spec = LAYOUTS[name]
    root = cifar_root(name, data_dir)
    meta = _unpickle(os.path.join(root, spec["meta"]))
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names"]])
    info = DatasetInfo(name, spec["n"], names, image_size, spec["mean"], spec["std"], False)

    def read(files):
        xs, ys = [], []
        for f in files:
            d = _unpickle(os.path.join(root, f))
            if "data" not in d or spec["labels"] not in d:
                raise DataError(f"{os.path.join(root, f)} lacks 'data' or '{spec['labels']}' (not a {name} file)")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[spec["labels"]], dtype=np.int64))
        x = resize_u8(torch.from_numpy(np.concatenate(xs)), image_size)
        return TensorImageSet(x, torch.from_numpy(np.concatenate(ys)), info)

    return read(spec["train"]), read(spec["test"])


for _name in ("cifar10", "cifar100"):
    register(DatasetSpec(_name, lambda data_dir, size, _n=_name: load_cifar_sets(_n, data_dir, size),
                         f"{_name.upper()}, Hugging Face Parquet or python-pickle layout in `data_dir`"))
