"""An exponential moving average of the student's weights, the model post-training evaluates when asked
(EDC, arXiv 2404.13733, evaluates an EMA of the student: a smoother model and less seed-to-seed spread).

Pure functions of state dicts, so the maths is tested alone and the average travels in checkpoints as
plain tensors (a resumed run continues the same average).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def ema_decay(decay: float, step: int) -> float:
    """The decay used at update `step` (0-based): `decay`, capped by (1 + step) / (10 + step) early on.

    Without the cap the first weights (a random student) would keep decay^n of
    the average after n updates: 0.999^400 = 0.67 for a CIFAR-10 IPC 10 run of
    400 one-step epochs. The cap (TensorFlow's ExponentialMovingAverage with
    num_updates) lets the average follow the student while few updates exist.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(average: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    """In place: average <- decay * average + (1 - decay) * current for floating-point entries (weights and
    BatchNorm running statistics); other entries (BatchNorm's batch counter) are copied."""
    for k, v in current.items():
        a = average[k]
        if a.is_floating_point():
            a.mul_(decay).add_(v.detach().to(a.dtype), alpha=1.0 - decay)
        else:
            a.copy_(v)


def init_average(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `model`'s state dict: the average before the first update."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def averaged_model(model: nn.Module, average: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` holding the averaged weights (the model itself is left as it trains)."""
    out = copy.deepcopy(model)
    out.load_state_dict(average)
    return out
