"""Datasets by name: `load_split(name, split, data_dir, image_size)`.

Every module of this package other than `base` and `registry` is one
dataset (or a family) and registers itself on import; they are imported
here by discovery, so adding a dataset is adding one module (plus its test).
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import DataError
from .base import (
    SPLITS,
    DatasetInfo,
    FolderImageSet,
    ImageSet,
    TensorImageSet,
    iterate,
    resize_u8,
    sample_per_class,
    stratified_split,
)
from .registry import DatasetSpec, check_options, dataset_info, get, load_split, names, preset_image_size, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["SPLITS", "DataError", "DatasetInfo", "DatasetSpec", "FolderImageSet", "ImageSet", "TensorImageSet",
           "check_options", "dataset_info", "get", "iterate", "load_split", "names", "preset_image_size", "register", "resize_u8", "sample_per_class",
           "stratified_split"]
