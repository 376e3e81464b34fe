"""The dataset registry: a name gives a loader, a preset and a validation split.

Nothing is ever downloaded: data comes from a package (scikit-learn's digits)
or from a local directory the user names. Each dataset module of this package
registers itself with `register(DatasetSpec(...))`.

Splits: `train` (the official training set), `test` (the official test set,
used only to report final numbers), `val` (a fixed stratified subset of train,
for tuning) and `train-noval` (train minus val, what a tuned teacher sees).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ConfigError
from .base import SPLITS, DatasetInfo, ImageSet, stratified_split

Loader = Callable[[str, int], "tuple[ImageSet, ImageSet]"]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset by name.

    load(data_dir, image_size) -> (train, test): `data_dir` is absolute, or ""
    when none was given; the loader caches what it reads. `preset`: the
    DistillConfig values this dataset runs with unless the user overrides them
    (top-level keys plus `squeeze`, `recover`, `posttrain` sections).
    `val_fraction`: the share of each class of train held out as `val`, a
    number or a function of the train labels.
    """

    name: str
    load: Loader
    preset: dict
    summary: str
    val_fraction: float | Callable[[np.ndarray], float] = 0.1
    needs_data_dir: bool = True


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"dataset {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        raise ConfigError("dataset", f"unknown value {name!r} (choose from {', '.join(names())})")
    return _REGISTRY[name]


def load_split(name: str, split: str, data_dir: str | None = None, image_size: int = 32) -> ImageSet:
    """One split of a registered dataset; raises DataError with what was expected where."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    spec = get(name)
    train, test = spec.load(os.path.abspath(data_dir) if data_dir else "", image_size)
    if split == "test":
        return test
    if split == "train":
        return train
    labels = train.labels.numpy()
    frac = spec.val_fraction(labels) if callable(spec.val_fraction) else spec.val_fraction
    rest, held = stratified_split(labels, frac, seed=0)
    return train.subset(held if split == "val" else rest)


def dataset_info(name: str, data_dir: str | None = None, image_size: int = 32) -> DatasetInfo:
    """Check the dataset is readable and describe it (loads in-memory sets once; cached)."""
    return load_split(name, "test", data_dir, image_size).info
