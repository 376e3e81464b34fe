"""Top-1 accuracy on a real split: every sample counted once, no partial-batch averaging."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..data import ImageSet, iterate
from .augment import normalize, to_float


@torch.no_grad()
def top1(model: nn.Module, ds: ImageSet, mean, std, device: torch.device | str = "cpu", batch_size: int = 256,
         num_workers: int | None = None) -> float:
    """Percent of `ds` classified correctly by `model` in eval mode."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for x, y in iterate(ds, batch_size, num_workers=num_workers, device=device):
        x = normalize(to_float(x.to(device, non_blocking=True)), mean, std)
        pred = model(x).argmax(dim=1)
        correct += (pred == y.to(device)).sum()
        total += len(y)
    model.train(was_training)
    return 100.0 * correct.item() / max(total, 1)
