"""Squeeze: train the backbone whose BatchNorm statistics recover will match.

SSL (SimCLR or MoCo-v3 style) pretrains the backbone without labels; a linear
head is then fitted on frozen features with every BatchNorm layer in eval
mode, so the running statistics are exactly those of SSL training. The
`supervised` method trains end to end (the SRe2L baseline).

The SSL objectives themselves live in core.ssl, by name.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import ImageSet, iterate
from ..models.factory import create_model, features, head
from ..models.runtime import autocast
from . import ssl
from .augment import color_jitter, normalize, random_flip, random_resized_crop, to_device, to_float
from .configs import SUPERVISED, SqueezeConfig
from .progress import Progress
from .schedules import cosine_lr, set_lr

log = logging.getLogger("scdd_ray")

def _crop(x_u8: torch.Tensor, size: int, cfg: SqueezeConfig, g: torch.Generator) -> torch.Tensor:
    """The view's random-resized crop in the model's layout (grid_sample writes NCHW; the backbone is
    channels_last): converted once here, the view's other ops keep it."""
    return random_resized_crop(to_float(x_u8), size, cfg.crop_scale, g).contiguous(memory_format=torch.channels_last)


def ssl_view(x_u8: torch.Tensor, size: int, cfg: SqueezeConfig, mean, std, g: torch.Generator) -> torch.Tensor:
    x = _crop(x_u8, size, cfg, g)
    if cfg.flip:
        x = random_flip(x, g)
    return normalize(color_jitter(x, g), mean, std)


def supervised_view(x_u8: torch.Tensor, size: int, cfg: SqueezeConfig, mean, std, g: torch.Generator) -> torch.Tensor:
    x = _crop(x_u8, size, cfg, g)
    if cfg.flip:
        x = random_flip(x, g)
    return normalize(x, mean, std)


def _steps(n: int, batch: int) -> int:
    return max(1, n // batch)


def _sgd(params, cfg: SqueezeConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def pretrain_ssl(model: nn.Module, train: ImageSet, cfg: SqueezeConfig, device, seed: int) -> None:
    """Self-supervised pretraining (`cfg.method`, an objective of core.ssl) of `model`'s backbone in place.

    Its `fc` is untouched.
    """
    info = train.info
    g = torch.Generator().manual_seed(seed)
    objective = ssl.get(cfg.method)(model, model.num_features, cfg.temperature, device)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("fc.")] + objective.parameters()
    opt = _sgd(trainable, cfg)
    batch = min(cfg.batch_size, len(train))
    total = cfg.epochs * _steps(len(train), batch)
    model.train()
    step = 0
    with Progress(total, f"squeeze {cfg.method}", "step") as bar:
        for epoch in range(cfg.epochs):
            for x, _ in iterate(train, batch, shuffle=True, generator=g, drop_last=True, device=device):
                set_lr(opt, cosine_lr(cfg.lr, step, total, warmup=min(10, total // 10)))
                x = x.to(device, non_blocking=True)
                v1 = ssl_view(x, info.image_size, cfg, info.mean, info.std, g)
                v2 = ssl_view(x, info.image_size, cfg, info.mean, info.std, g)
                with autocast(device):
                    loss = objective.loss(model, v1, v2, step, total)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1, epoch=epoch)
    log.info("squeeze %s: final loss %.4f", cfg.method, float(loss.detach()))


@torch.no_grad()
def _embed(model: nn.Module, ds: ImageSet, device) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for x, y in iterate(ds, 256, device=device):
        x = normalize(to_float(x.to(device, non_blocking=True)), ds.info.mean, ds.info.std)
        feats.append(features(model, x).float())
        labels.append(y.to(device, non_blocking=True))
    return torch.cat(feats), torch.cat(labels)


def linear_probe(model: nn.Module, train: ImageSet, cfg: SqueezeConfig, device, seed: int) -> None:
    """Fit only the linear head on frozen, un-augmented features.

    The backbone runs in eval mode under no_grad, so no BatchNorm running
    statistic moves: they stay exactly those of SSL pretraining.
    """
    model.eval()
    feats, labels = _embed(model, train, device)
    fc = head(model)
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(fc.parameters(), lr=1e-2)
    n, batch = len(labels), 256
    total = cfg.probe_epochs * ((n + batch - 1) // batch)
    step = 0
    for _ in range(cfg.probe_epochs):
        order = to_device(torch.randperm(n, generator=g), device)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            set_lr(opt, cosine_lr(1e-2, step, total))
            loss = F.cross_entropy(fc(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1


def train_supervised(model: nn.Module, train: ImageSet, cfg: SqueezeConfig, device, seed: int) -> None:
    info = train.info
    g = torch.Generator().manual_seed(seed)
    opt = _sgd(model.parameters(), cfg)
    batch = min(cfg.batch_size, len(train))
    total = cfg.epochs * _steps(len(train), batch)
    model.train()
    step = 0
    with Progress(total, "squeeze supervised", "step") as bar:
        for epoch in range(cfg.epochs):
            for x, y in iterate(train, batch, shuffle=True, generator=g, drop_last=True, device=device):
                set_lr(opt, cosine_lr(cfg.lr, step, total, warmup=min(10, total // 10)))
                v = supervised_view(x.to(device, non_blocking=True), info.image_size, cfg, info.mean, info.std, g)
                with autocast(device):
                    loss = F.cross_entropy(model(v), y.to(device, non_blocking=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1, epoch=epoch)
    model.eval()


def squeeze(train: ImageSet, arch: str, width: float, cfg: SqueezeConfig, device="cpu", seed: int = 0,
            small_input: bool = True) -> nn.Module:
    """Train a backbone + linear head on `train` with `cfg.method`; returns it in eval mode on `device`."""
    torch.manual_seed(seed)  # model initialisation
    model = create_model(arch, train.info.num_classes, width, small_input).to(device, memory_format=torch.channels_last)
    if cfg.method == SUPERVISED:
        train_supervised(model, train, cfg, device, seed)
    else:
        pretrain_ssl(model, train, cfg, device, seed)
        linear_probe(model, train, cfg, device, seed)
    model.eval()
    return model
