"""scikit-learn's bundled handwritten digits: the embedded default dataset.

1,797 grayscale 8x8 images of 10 classes, split 80/20 (stratified, fixed);
the preset runs the whole pipeline on a laptop CPU in minutes (sized by
measurement, see README) at 16x16, since the source is 8x8.
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


PRESET = dict(
    image_size=16, arch="resnet18", width=0.25, ipc=10,
    squeeze=dict(epochs=40, batch_size=128, lr=0.1, weight_decay=5e-4, temperature=0.5,
                 crop_scale=(0.5, 1.0), flip=False, probe_epochs=100),
    recover=dict(iterations=500, lr=0.25, bn_coef=1.0, bn_weights="first:10", jitter=4,
                 crop_scale=(0.5, 1.0), flip=False, init="noise", classes_per_batch=10, grayscale=False),
    posttrain=dict(student="resnet18", student_width=0.25, epochs=200, batch_size=25, optimizer="adamw",
                   lr=2e-3, weight_decay=0.01, temperature=4.0, mix="cutmix", mix_prob=0.5,
                   crop_scale=(0.5, 1.0), flip=False),
)

register(DatasetSpec("digits", lambda data_dir, size: load_digits_sets(size), PRESET,
                     "scikit-learn's digits (embedded, 10 classes)"))
