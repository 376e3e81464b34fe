"""Feeding a model inputs normalised with other statistics than those it was trained with."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import Checkpoint


class Renormalize(nn.Module):
    """Feed a model trained with other mean/std: re-map normalised inputs first."""

    def __init__(self, model: nn.Module, from_mean, from_std, to_mean, to_std):
        super().__init__()
        self.model = model
        fm, fs = torch.tensor(from_mean).view(1, -1, 1, 1), torch.tensor(from_std).view(1, -1, 1, 1)
        tm, ts = torch.tensor(to_mean).view(1, -1, 1, 1), torch.tensor(to_std).view(1, -1, 1, 1)
        self.register_buffer("scale", fs / ts)
        self.register_buffer("shift", (fm - tm) / ts)

    def forward(self, x):
        return self.model(x * self.scale + self.shift)


def adapt_inputs(model: nn.Module, ckpt: Checkpoint, info) -> nn.Module:
    """`model` (built from `ckpt`) fed inputs normalised with `info`'s mean/std (a data.DatasetInfo)."""
    if np.allclose(ckpt.mean, info.mean, atol=1e-4) and np.allclose(ckpt.std, info.std, atol=1e-4):
        return model
    return Renormalize(model, info.mean, info.std, ckpt.mean, ckpt.std)
