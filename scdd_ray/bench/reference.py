"""The reference recover loop, written the way research scripts write it, for speed comparisons
(`scdd-ray bench recover`, benchmarks/recover_vs_reference.py, benchmarks/gpu_check.py): BN statistics in
forward hooks via x.mean([0,2,3]) and x.permute(1,0,2,3).contiguous().view(C,-1).var(1, unbiased=False),
the loss read back to the host every step (`loss.item()`), float32, NCHW, clipping channel by channel."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.augment import denormalize, random_flip, random_roll, to_uint8
from ..core.bn import parse_bn_weights
from ..core.configs import RecoverConfig


class RefBNHook:
    """The reference scripts' BN feature hook."""

    def __init__(self, module: nn.BatchNorm2d):
        self.hook = module.register_forward_hook(self.fn)
        self.r_feature = None

    def fn(self, module, inputs, output):
        x = inputs[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)

    def close(self):
        self.hook.remove()


def reference_recover(model, targets, cfg: RecoverConfig, mean, std, image_size: int, seed: int,
                      device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(targets)
    targets = targets.to(device)
    x = torch.randn(n, 3, image_size, image_size, generator=g).to(device).requires_grad_(True)
    hooks = [RefBNHook(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    weights = parse_bn_weights(cfg.bn_weights).resolve(len(hooks))
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    log = []
    for it in range(cfg.iterations):
        lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
        for group in opt.param_groups:
            group["lr"] = lr
        xi = random_flip(x, g) if cfg.flip else x
        xi = random_roll(xi, cfg.jitter, g)
        logits = model(xi)
        ce = F.cross_entropy(logits, targets)
        bn = sum(w * h.r_feature for w, h in zip(weights, hooks))
        loss = ce + cfg.bn_coef * bn
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for c in range(3):
                m, s = mean[c], std[c]
                x.data[:, c] = torch.clamp(x.data[:, c], -m / s, (1 - m) / s)
        log.append(loss.item())  # the per-step host read-back of the reference scripts
    for h in hooks:
        h.close()
    return to_uint8(denormalize(x.detach(), mean, std))
