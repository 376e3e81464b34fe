"""scikit-learn's bundled handwritten digits: the embedded default dataset.

1,797 grayscale 8x8 images of 10 classes, split 80/20 (stratified, fixed);
its preset (presets/digits.yaml) runs the whole pipeline on a laptop CPU in
minutes at 16x16, since the source is 8x8.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .base import DatasetInfo, TensorImageSet, resize_u8, stratified_split
from .registry import DatasetSpec, register


@lru_cache(maxsize=8)
def load_digits_sets(image_size: int) -> tuple[TensorImageSet, TensorImageSet]:
    # Deferred: scikit-learn takes about a second to import and only this dataset needs it.
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0 * 255.0).round().astype(np.uint8)).unsqueeze(1)  # N,1,8,8
    x = resize_u8(x, image_size).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    train_idx, test_idx = stratified_split(d.target, 0.2, seed=0)
    # Grayscale statistics of the training split, the same for all three channels.
    t = x[torch.as_tensor(train_idx)][:, 0].float() / 255.0
    mean, std = float(t.mean()), float(t.std())
    info = DatasetInfo("digits", 10, tuple(str(i) for i in range(10)), image_size, (mean,) * 3, (std,) * 3, True)
    tr = TensorImageSet(x[torch.as_tensor(train_idx)], y[torch.as_tensor(train_idx)], info)
    te = TensorImageSet(x[torch.as_tensor(test_idx)], y[torch.as_tensor(test_idx)], info)
    return tr, te


register(DatasetSpec("digits", lambda data_dir, size: load_digits_sets(size),
                     "scikit-learn's digits (embedded, 10 classes)"))
