"""A committee of relabelling teachers: several models whose soft labels on each crop are averaged.

CV-DD (arXiv 2501.07575) lets several models vote on the synthetic data; here the vote is on the labels:
each member labels the student's very crop and the committee's label is the mean of theirs, either of
their probabilities at the distillation temperature (`prob`, an ensemble's prediction) or of their logits
(`logit`). One teacher is a committee of one: its logits pass through unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SPACES = ("prob", "logit")


def committee_logits(logits: list[torch.Tensor], space: str, temperature: float) -> torch.Tensor:
    """The committee's logits from its members' (each (N, K)).

    logit: their mean. prob: T * log(mean_i softmax(z_i / T)), the logits whose softmax at temperature T
    (what the distillation loss takes) is exactly the members' mean probability.
    """
    if space not in SPACES:
        raise ValueError(f"committee space must be one of {', '.join(SPACES)} (got {space!r})")
    if len(logits) == 1:
        return logits[0]
    z = torch.stack([x.float() for x in logits])
    if space == "logit":
        return z.mean(0)
    logp = F.log_softmax(z / temperature, dim=2)
    return temperature * (torch.logsumexp(logp, dim=0) - math.log(len(logits)))


class Committee(nn.Module):
    """Frozen members called on the same input; `forward` gives `committee_logits` of their outputs."""

    def __init__(self, members: list[nn.Module], space: str, temperature: float):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.space, self.temperature = space, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return committee_logits([m(x) for m in self.members], self.space, self.temperature)


def members(teacher) -> tuple:
    """The checkpoints of a teacher: one checkpoint, or a committee given as a tuple or list of them."""
    return tuple(teacher) if isinstance(teacher, (tuple, list)) else (teacher,)
