"""ImageFolder datasets (ImageNet, Tiny-ImageNet): DIR/train/<class>/* and DIR/val/<class>/* (or DIR/test/).

Images are read lazily with PIL, resized (shorter side to size/0.875) and
centre-cropped. The preset (presets/imagefolder.yaml) follows the authors'
ImageNet-1K scripts.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from ..errors import DataError
from .base import DatasetInfo, FolderImageSet
from .registry import DatasetSpec, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _scan(folder: str) -> tuple[list[str], list[list[str]]]:
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files = []
    for c in classes:
        cdir = os.path.join(folder, c)
        files.append(sorted(os.path.join(cdir, f) for f in os.listdir(cdir) if f.lower().endswith(IMAGE_EXTS)))
    return classes, files


@lru_cache(maxsize=4)
def load_imagefolder_sets(data_dir: str, image_size: int) -> tuple[FolderImageSet, FolderImageSet]:
    if not data_dir:
        raise DataError("`data_dir` is required for imagefolder: a directory with train/<class>/*.jpg and "
                        "val/<class>/*.jpg (Tiny-ImageNet / ImageNet layout)")
    tr_dir = os.path.join(data_dir, "train")
    # The held-out split is val/ (ImageNet, Tiny-ImageNet) or test/ (many other folder datasets).
    va_dir = next((d for d in (os.path.join(data_dir, "val"), os.path.join(data_dir, "test")) if os.path.isdir(d)),
                  os.path.join(data_dir, "val"))
    for d in (tr_dir, va_dir):
        if not os.path.isdir(d):
            raise DataError(f"`data_dir` {data_dir}: missing {d} (expected train/<class>/* and val/<class>/* "
                            "or test/<class>/*)")
    classes, files = _scan(tr_dir)
    if not classes or not any(files):
        raise DataError(f"`data_dir` {data_dir}: {tr_dir} has no class folders with images")
    empty = [c for c, f in zip(classes, files) if not f]
    if empty:
        raise DataError(f"`data_dir` {data_dir}: class folder train/{empty[0]} has no images")
    vclasses, vfiles = _scan(va_dir)
    unknown = sorted(set(vclasses) - set(classes))
    if unknown:
        raise DataError(f"`data_dir` {data_dir}: {os.path.basename(va_dir)}/{unknown[0]} is not a class of train/")
    cid = {c: i for i, c in enumerate(classes)}
    info = DatasetInfo("imagefolder", len(classes), tuple(classes), image_size, IMAGENET_MEAN, IMAGENET_STD, False)
    # Standard evaluation resize: shorter side to size/0.875, then centre crop.
    resize = int(round(image_size / 0.875))
    train = FolderImageSet([p for f in files for p in f], [i for i, f in enumerate(files) for _ in f], info, resize)
    test = FolderImageSet([p for f in vfiles for p in f], [cid[c] for c, f in zip(vclasses, vfiles) for _ in f],
                          info, resize)
    return train, test


def val_fraction(labels: np.ndarray) -> float:
    """At most 10% and at most 50 images per class held out for validation."""
    return min(0.1, 50.0 / max(1, np.bincount(labels).min()))


register(DatasetSpec("imagefolder", load_imagefolder_sets,
                     "ImageFolder layout (`data_dir`/train/<class>/*, `data_dir`/val/<class>/*)",
                     val_fraction=val_fraction))
