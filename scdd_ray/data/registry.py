"""The dataset registry: a name gives a loader and a validation split (its preset is a file of
scdd_ray/presets named after it).

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

from ..errors import ConfigError, DataError
from .base import SPLITS, DatasetInfo, ImageSet, stratified_split

Loader = Callable[..., "tuple[ImageSet, ...]"]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset by name.

    load(data_dir, image_size, **options) -> (train, test) or (train, test,
    validation): `data_dir` is absolute, or "" when none was given; test or
    validation may be None when the dataset has none; the loader caches what it
    reads. `options`: the keyword options `load` takes (e.g. column names).
    `native_size(data_dir)`, when given, replaces the preset's image size by
    the data's own. `val_fraction`: the share of each class of train
    held out as `val` when the dataset has no validation split, a number or a
    function of the train labels.
    """

    name: str
    load: Loader
    summary: str
    val_fraction: float | Callable[[np.ndarray], float] = 0.1
    options: tuple[str, ...] = ()
    native_size: Callable[[str], int | None] | None = None


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


def check_options(name: str, options: dict) -> None:
    spec = get(name)
    for k, v in options.items():
        if v is not None and k not in spec.options:
            raise ConfigError(k, f"does not apply to dataset {name!r}"
                                 + (f" (its options: {', '.join(spec.options)})" if spec.options else ""))


def load_split(name: str, split: str, data_dir: str | None = None, image_size: int = 32, **options) -> ImageSet:
    """One split of a registered dataset; raises DataError with what was expected where.

    `options` are the dataset's own (see DatasetSpec.options); None values are ignored.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    spec = get(name)
    check_options(name, options)
    given = {k: v for k, v in options.items() if v is not None}
    root = os.path.abspath(data_dir) if data_dir else ""
    train, test, *rest = spec.load(root, image_size, **given)
    _check_classes(train, root)
    validation = rest[0] if rest else None
    if split == "test":
        if test is None:
            raise DataError(f"`data_dir` {root} has no test split")
        return test
    if split == "train" or (split == "train-noval" and validation is not None):
        return train
    if validation is not None:
        return validation
    labels = train.labels.numpy()
    frac = spec.val_fraction(labels) if callable(spec.val_fraction) else spec.val_fraction
    rest_idx, held = stratified_split(labels, frac, seed=0)
    return train.subset(held if split == "val" else rest_idx)


def _check_classes(train: ImageSet, root: str) -> None:
    """Every class has training images: recover cannot start from a real image of one without (`recover.init`
    real), the random baseline cannot draw any, and its linear head is never trained."""
    counts = np.bincount(train.labels.numpy(), minlength=train.info.num_classes)
    if (counts == 0).any():
        c = int(np.flatnonzero(counts == 0)[0])
        where = f"`data_dir` {root}: " if root else f"{train.info.name}: "
        raise DataError(f"{where}class {c} ({train.info.class_names[c]!r}) has no images in the train split; every "
                        "class needs training images")


def dataset_info(name: str, data_dir: str | None = None, image_size: int = 32, **options) -> DatasetInfo:
    """Check the dataset is readable and describe it (loads in-memory sets once; cached)."""
    return load_split(name, "test", data_dir, image_size, **options).info


def preset_image_size(name: str, data_dir: str | None, preset_size: int) -> int:
    """The image size a run of `name` uses unless told otherwise: the data's own, or its preset's."""
    spec = get(name)
    size = spec.native_size(os.path.abspath(data_dir)) if spec.native_size and data_dir else None
    return size or preset_size
