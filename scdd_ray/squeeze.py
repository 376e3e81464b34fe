"""Squeeze: train the backbone whose BatchNorm statistics recover will match.

SSL (SimCLR or MoCo-v3 style) pretrains the backbone without labels; a linear
head is then fitted on frozen features with every BatchNorm layer in eval
mode, so the running statistics are exactly those of SSL training. The
`supervised` method trains end to end (the SRe2L baseline).
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import color_jitter, normalize, random_flip, random_resized_crop, to_float
from .config import SqueezeConfig
from .data import ImageSet, iterate
from .models import autocast, create_model, features, head
from .progress import Progress
from .schedules import cosine_lr, set_lr

log = logging.getLogger("scdd_ray")


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
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, target)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo-v3 contrastive loss: the key of the same image is the positive, in-batch keys the negatives."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * (2 * temperature)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden, bias=False), nn.BatchNorm1d(d_hidden), nn.ReLU(inplace=True),
                         nn.Linear(d_hidden, d_out))


def ssl_view(x_u8: torch.Tensor, size: int, cfg: SqueezeConfig, mean, std, g: torch.Generator) -> torch.Tensor:
    x = random_resized_crop(to_float(x_u8), size, cfg.crop_scale, g)
    if cfg.flip:
        x = random_flip(x, g)
    return normalize(color_jitter(x, g), mean, std)


def supervised_view(x_u8: torch.Tensor, size: int, cfg: SqueezeConfig, mean, std, g: torch.Generator) -> torch.Tensor:
    x = random_resized_crop(to_float(x_u8), size, cfg.crop_scale, g)
    if cfg.flip:
        x = random_flip(x, g)
    return normalize(x, mean, std)


def _steps(n: int, batch: int) -> int:
    return max(1, n // batch)


def _sgd(params, cfg: SqueezeConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def pretrain_ssl(model: nn.Module, train: ImageSet, cfg: SqueezeConfig, device, seed: int) -> None:
    """SimCLR or MoCo-v3 pretraining of `model`'s backbone in place (its `fc` is untouched)."""
    info = train.info
    g = torch.Generator().manual_seed(seed)
    dim = model.num_features
    projector = mlp(dim, dim, 128).to(device)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("fc.")] + list(projector.parameters())
    predictor = momentum_model = momentum_proj = None
    if cfg.method == "mocov3":
        predictor = mlp(128, dim, 128).to(device)
        trainable += list(predictor.parameters())
        momentum_model, momentum_proj = copy.deepcopy(model), copy.deepcopy(projector)
        for p in list(momentum_model.parameters()) + list(momentum_proj.parameters()):
            p.requires_grad_(False)
    opt = _sgd(trainable, cfg)
    ntxent = NTXentLoss(cfg.temperature)
    batch = min(cfg.batch_size, len(train))
    total = cfg.epochs * _steps(len(train), batch)
    model.train()
    step = 0
    with Progress(total, f"squeeze {cfg.method}", "step") as bar:
        for epoch in range(cfg.epochs):
            for x, _ in iterate(train, batch, shuffle=True, generator=g, drop_last=True):
                set_lr(opt, cosine_lr(cfg.lr, step, total, warmup=min(10, total // 10)))
                x = x.to(device, non_blocking=True)
                v1 = ssl_view(x, info.image_size, cfg, info.mean, info.std, g)
                v2 = ssl_view(x, info.image_size, cfg, info.mean, info.std, g)
                with autocast(device):
                    if cfg.method == "simclr":
                        loss = ntxent(projector(features(model, v1)), projector(features(model, v2)))
                    else:
                        q1 = predictor(projector(features(model, v1)))
                        q2 = predictor(projector(features(model, v2)))
                        with torch.no_grad():
                            _ema(momentum_model, model, momentum_proj, projector, step, total)
                            k1 = momentum_proj(features(momentum_model, v1))
                            k2 = momentum_proj(features(momentum_model, v2))
                        loss = info_nce(q1, k2, cfg.temperature) + info_nce(q2, k1, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1, epoch=epoch)
    log.info("squeeze %s: final loss %.4f", cfg.method, float(loss.detach()))


def _ema(m_model, model, m_proj, proj, step: int, total: int, base: float = 0.99) -> None:
    """MoCo-v3 momentum update with the momentum cosine-annealed from `base` to 1."""
    m = 1 - (1 - base) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / max(total, 1)))).item()
    for dst, src in ((m_model, model), (m_proj, proj)):
        for pd, ps in zip(dst.parameters(), src.parameters()):
            pd.mul_(m).add_(ps.detach(), alpha=1 - m)
        for bd, bs in zip(dst.buffers(), src.buffers()):
            bd.copy_(bs)


@torch.no_grad()
def _embed(model: nn.Module, ds: ImageSet, device) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for x, y in iterate(ds, 256):
        x = normalize(to_float(x.to(device)), ds.info.mean, ds.info.std)
        feats.append(features(model, x).float())
        labels.append(y.to(device))
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
        order = torch.randperm(n, generator=g).to(device)
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
            for x, y in iterate(train, batch, shuffle=True, generator=g, drop_last=True):
                set_lr(opt, cosine_lr(cfg.lr, step, total, warmup=min(10, total // 10)))
                v = supervised_view(x.to(device, non_blocking=True), info.image_size, cfg, info.mean, info.std, g)
                with autocast(device):
                    loss = F.cross_entropy(model(v), y.to(device))
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
    if cfg.method == "supervised":
        train_supervised(model, train, cfg, device, seed)
    else:
        pretrain_ssl(model, train, cfg, device, seed)
        linear_probe(model, train, cfg, device, seed)
    model.eval()
    return model
