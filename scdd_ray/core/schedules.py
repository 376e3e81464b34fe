"""Learning-rate schedules as pure functions of the step."""
from __future__ import annotations

import math


def cosine_lr(base_lr: float, step: int, total: int, warmup: int = 0, final_lr: float = 0.0,
              period: float = 1.0) -> float:
    """Linear warm-up for `warmup` steps, then cosine from base_lr towards final_lr, which it reaches after
    `period` times the steps left after the warm-up: at `total` with period 1; with period 3 (the authors'
    CIFAR post-training) the rate ends at 0.75 of base_lr."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    t = min(max(t, 0.0), 1.0) / period
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
