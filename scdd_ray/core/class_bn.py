"""Category-aware BatchNorm matching (EDC, arXiv 2404.13733): besides the global running statistics, each
class's feature mean and variance at every BN layer, in the synthetic batch, is matched against that class's
statistics over the real training images as the recovery model sees them.

`class_statistics` gathers the per-class statistics once (the run caches them beside its models);
`ClassBNMatch` records, during the recover forward, each layer's per-class term of the batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .bn import batch_stats, bn_layers, match_term, smoothed


FORMS = ("class", "soft")


@torch.no_grad()
def class_statistics(model: nn.Module, batches, num_classes: int) -> list[tuple[torch.Tensor, ...]]:
    """Per BatchNorm2d layer (model order): (mean, variance, within-image variance), each (num_classes,
    channels) float32, of the layer's input over the class's images: the mean and biased variance over every
    image of the class and every pixel, and the mean over its images of each image's own (biased, over
    pixels) variance, the statistic EDC's soft matching targets.

    `batches` yields (normalised images, labels). Sums are kept in float64 per class, so the result does not
    depend on how the images are batched. A class without images gets zeros (never matched: no synthetic
    image of a class the data lacks exists).
    """
    layers = bn_layers(model)
    if not layers:
        raise ValueError("model has no BatchNorm2d layer to gather statistics from")
    sums = [None] * len(layers)
    labels_now: list[torch.Tensor] = []

    def hook(i):
        def record(module, inputs, output):
            x = inputs[0].double()
            n, c = x.shape[:2]
            s1 = x.sum(dim=(2, 3))  # (N, C)
            s2 = (x * x).sum(dim=(2, 3))
            within = x.var(dim=(2, 3), correction=0)  # each image's own variance
            onehot = torch.zeros(num_classes, n, dtype=torch.float64, device=x.device)
            onehot[labels_now[0], torch.arange(n, device=x.device)] = 1.0
            add = (onehot @ s1, onehot @ s2, onehot.sum(1) * (x.shape[2] * x.shape[3]), onehot @ within,
                   onehot.sum(1))
            sums[i] = add if sums[i] is None else tuple(a + b for a, b in zip(sums[i], add))
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            labels_now[:] = [y.to(x.device).long()]
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for s1, s2, count, within, images in sums:
        count = count.clamp(min=1).unsqueeze(1)
        mean = s1 / count
        out.append((mean.float().cpu(), (s2 / count - mean * mean).clamp(min=0).float().cpu(),
                    (within / images.clamp(min=1).unsqueeze(1)).float().cpu()))
    return out


def class_match_term(mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor,
                     normalize: str = "none", eps: float = 1e-5) -> torch.Tensor:
    """The mean over rows (classes) of ||mean - ref_mean||_2 + ||var - ref_var||_2, each (G, C); with
    normalize "channel" each gap is in units of the class's own scale, RMS over channels (as bn.match_term)."""
    if normalize == "channel":
        c = mean.shape[1] ** 0.5
        scale = (ref_var + eps)
        return (torch.linalg.vector_norm((mean - ref_mean) / scale.sqrt(), dim=1) / c
                + torch.linalg.vector_norm((var - ref_var) / scale, dim=1) / c).mean()
    return (torch.linalg.vector_norm(mean - ref_mean, dim=1) + torch.linalg.vector_norm(var - ref_var, dim=1)).mean()


class ClassBNMatch:
    """Context manager that records each BN layer's category-aware term during a forward of a batch whose rows
    have classes `targets` (fixed for the life of the context, as a recover batch's are).

    stats: `class_statistics` of the model; weights and normalize as bn.BNMatch, so the per-layer weights
    (`recover.bn_weights`) and depth normalisation apply to both terms alike. form "class": each class of
    the batch, its images' mean and variance against the class's; "soft" (EDC's code): the whole batch's
    mean and variance against the mean over its rows of their classes' mean and within-image variance.
    momentum: the matched statistics smoothed over iterations (bn.smoothed, EDC's flatness).
    """

    def __init__(self, model: nn.Module, stats, targets: torch.Tensor, weights=None, normalize: str = "none",
                 form: str = "class", momentum: float = 0.0):
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)} (got {form!r})")
        self.form, self.momentum, self._smoothed = form, momentum, {}
        self.layers = bn_layers(model)
        if len(stats) != len(self.layers):
            raise ValueError(f"class statistics hold {len(stats)} layers but the model has {len(self.layers)}")
        n = len(self.layers)
        self.normalize = normalize
        device = targets.device
        # on the batch's device once: a copy every iteration would be a host-to-GPU transfer per step
        self.weights = torch.tensor([1.0] * n if weights is None else [float(w) for w in weights], device=device)
        classes, inverse = torch.unique(targets, return_inverse=True)
        member = torch.zeros(len(classes), len(targets), device=device)
        member[inverse, torch.arange(len(targets), device=device)] = 1.0
        self.average = member / member.sum(1, keepdim=True)  # (G, N): each row averages its class's images
        self.row_mean = [s[0].to(device)[targets] for s in stats]  # (N, C): the reference of each row's class
        self.ref = [(s[0].to(device)[classes], s[1].to(device)[classes]) for s in stats]  # (G, C)
        # soft: one target per layer, the rows' classes averaged (a class counts once per image of it)
        self.soft = [(s[0].to(device)[targets].mean(0), s[2].to(device)[targets].mean(0)) for s in stats]
        self._terms: list[torch.Tensor | None] = [None] * n
        self._handles: list = []

    def _hook(self, i: int):
        def record(module, inputs, output):
            if self.form == "soft":
                ref_mean, ref_var = self.soft[i]
                mean, var = batch_stats(inputs[0], ref_mean)
                if self.momentum > 0:
                    mean, var = smoothed(self._smoothed, i, (mean, var), self.momentum)
                self._terms[i] = match_term(mean, var, ref_mean, ref_var, self.normalize)
                return
            # Shifted by each row's reference mean: E[d^2] - E[d]^2 keeps the variance free of cancellation.
            d = inputs[0].float() - self.row_mean[i][:, :, None, None]
            md = self.average @ d.mean(dim=(2, 3))
            var = self.average @ (d * d).mean(dim=(2, 3)) - md * md
            ref_mean, ref_var = self.ref[i]
            mean = md + ref_mean
            if self.momentum > 0:
                mean, var = smoothed(self._smoothed, i, (mean, var), self.momentum)
            self._terms[i] = class_match_term(mean, var, ref_mean, ref_var, self.normalize)
        return record

    def __enter__(self) -> "ClassBNMatch":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def loss(self) -> torch.Tensor:
        t = torch.stack(self._terms)
        total = (t * self.weights).sum()
        return total if self.normalize == "none" else total / len(self.layers)
