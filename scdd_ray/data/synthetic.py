"""A tiny generated dataset for tests: class-dependent colour blobs plus noise."""
from __future__ import annotations

from functools import lru_cache

import torch

from .base import DatasetInfo, TensorImageSet, stratified_split
from .registry import DatasetSpec, register


@lru_cache(maxsize=4)
def load_synthetic_sets(image_size: int, num_classes: int = 4,
                        per_class: int = 24) -> tuple[TensorImageSet, TensorImageSet]:
    """Learnable, tiny, deterministic."""
    g = torch.Generator().manual_seed(1234)
    n = num_classes * per_class
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    base = torch.rand(num_classes, 3, 1, 1, generator=g)
    x = base[labels] * 0.7 + torch.rand(n, 3, image_size, image_size, generator=g) * 0.3
    images = (x * 255).round().to(torch.uint8)
    info = DatasetInfo("synthetic", num_classes, tuple(f"class{i}" for i in range(num_classes)), image_size,
                       (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)
    full = TensorImageSet(images, labels, info)
    tr, te = stratified_split(labels.numpy(), 0.25, seed=0)
    return full.subset(tr), full.subset(te)


register(DatasetSpec("synthetic", lambda data_dir, size: load_synthetic_sets(size),
                     "generated colour blobs (tests)", val_fraction=0.25))
