"""Self-supervised objectives for squeeze, by name.

An objective owns the modules it adds to the backbone (projector, predictor,
momentum copies) and computes the loss of one pair of augmented views. To
add one: a class with the `SSLObjective` shape, decorated with
`@register("name")`, in this file, plus its test.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.factory import features


class NTXentLoss(nn.Module):
    """SimCLR's normalised-temperature cross entropy over 2N views.

    Each view's positive is the other view of its image; the other 2N-2 views
    of the batch are negatives.
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        sim = z @ z.t() / self.temperature
        sim.fill_diagonal_(float("-inf"))
        target = torch.arange(2 * n, device=z.device).roll(n)  # view i's positive is view i + n (mod 2n)
        return F.cross_entropy(sim, target)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo-v3 contrastive loss: the key of the same image is the positive, in-batch keys the negatives."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * (2 * temperature)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden, bias=False), nn.BatchNorm1d(d_hidden), nn.ReLU(inplace=True),
                         nn.Linear(d_hidden, d_out))


class SSLObjective:
    """Built once per pretraining: `model` is the backbone, `dim` its embedding width."""

    def __init__(self, model: nn.Module, dim: int, temperature: float, device):
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains besides the backbone (in a fixed order)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, v1: torch.Tensor, v2: torch.Tensor, step: int, total: int) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Everything of the objective's that training changes (projectors, momentum copies), by name: what a
        resumed squeeze must restore besides the backbone."""
        return {k: v for k, v in vars(self).items() if isinstance(v, nn.Module)}


_REGISTRY: dict[str, type[SSLObjective]] = {}


def register(name: str) -> Callable[[type[SSLObjective]], type[SSLObjective]]:
    def add(cls: type[SSLObjective]) -> type[SSLObjective]:
        if name in _REGISTRY:
            raise ValueError(f"SSL objective {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls
    return add


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> type[SSLObjective]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown SSL objective {name!r} (choose from {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


@register("simclr")
class SimCLR(SSLObjective):
    """Projector MLP + NT-Xent between the two views' projections."""

    def __init__(self, model: nn.Module, dim: int, temperature: float, device):
        self.projector = mlp(dim, dim, 128).to(device)
        self.ntxent = NTXentLoss(temperature)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters())

    def loss(self, model, v1, v2, step, total):
        return self.ntxent(self.projector(features(model, v1)), self.projector(features(model, v2)))


@register("mocov3")
class MoCoV3(SSLObjective):
    """Projector + predictor on the online side, momentum copies of backbone and projector as keys."""

    def __init__(self, model: nn.Module, dim: int, temperature: float, device):
        self.temperature = temperature
        self.projector = mlp(dim, dim, 128).to(device)
        self.predictor = mlp(128, dim, 128).to(device)
        self.momentum_model, self.momentum_proj = copy.deepcopy(model), copy.deepcopy(self.projector)
        for p in list(self.momentum_model.parameters()) + list(self.momentum_proj.parameters()):
            p.requires_grad_(False)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters()) + list(self.predictor.parameters())

    def loss(self, model, v1, v2, step, total):
        q1 = self.predictor(self.projector(features(model, v1)))
        q2 = self.predictor(self.projector(features(model, v2)))
        with torch.no_grad():
            ema(self.momentum_model, model, self.momentum_proj, self.projector, step, total)
            k1 = self.momentum_proj(features(self.momentum_model, v1))
            k2 = self.momentum_proj(features(self.momentum_model, v2))
        return info_nce(q1, k2, self.temperature) + info_nce(q2, k1, self.temperature)


@torch.no_grad()
def ema(m_model, model, m_proj, proj, step: int, total: int, base: float = 0.99) -> None:
    """MoCo-v3 momentum update with the momentum cosine-annealed from `base` to 1.

    A few multi-tensor kernels for every parameter and buffer together (`torch._foreach_*`), not two
    launches per tensor: a ResNet-50 and its projector hold about 330 tensors.
    """
    m = 1 - (1 - base) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    dst_p = [p for mod in (m_model, m_proj) for p in mod.parameters()]
    src_p = [p for mod in (model, proj) for p in mod.parameters()]
    torch._foreach_mul_(dst_p, m)
    torch._foreach_add_(dst_p, src_p, alpha=1 - m)
    torch._foreach_copy_([b for mod in (m_model, m_proj) for b in mod.buffers()],
                         [b for mod in (model, proj) for b in mod.buffers()])
