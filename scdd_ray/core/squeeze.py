"""Squeeze: train the backbone whose BatchNorm statistics recover will match.

SSL (SimCLR or MoCo-v3 style) pretrains the backbone without labels; a linear
head is then fitted on frozen features with every BatchNorm layer in eval
mode, so the running statistics are exactly those of SSL training. The
`supervised` method trains end to end (the SRe2L baseline).

The SSL objectives themselves live in core.ssl, by name.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import ImageSet, iterate
from ..models.factory import create_model, features, head
from ..models.runtime import autocast
from ..store.atomic import atomic_write_bytes
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


class Resume:
    """Where a squeeze keeps its progress, so that a stopped run (a session's end, SIGTERM, kill -9, a lost
    node) goes on where it stopped instead of from scratch: a ResNet-101 SimCLR squeeze is hours of CPU.

    The state (model, optimiser, the objective's own modules, the shuffling and augmentation generator, the
    step, the epoch's order) is written atomically every `every_s` seconds and at each epoch's end, so a
    kill loses at most that much work and never leaves a half-written file. `key` names everything that
    makes the model (data, split, architecture, settings, seed): a file made under another key is not used.
    A resumed run draws the same batches and augmentations as an uninterrupted one (mid-epoch only for
    in-memory datasets; a DataLoader's shuffle resumes at epoch boundaries)."""

    def __init__(self, path: str, key: str, every_s: float):
        self.path, self.key, self.every_s = path, key, every_s
        self._last = self._start = time.monotonic()
        self.before = 0.0  # seconds the saved progress took in earlier processes (0 until `load` finds some)

    def load(self, device) -> dict | None:
        if not os.path.isfile(self.path):
            return None
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)  # never code from OUT
        except Exception as e:  # a damaged file only costs the work it held
            log.warning("squeeze: cannot read %s (%s); starting over", self.path, e)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            log.warning("squeeze: %s was made with other settings; starting over", self.path)
            return None
        self.before = float(state.get("seconds", 0.0))  # files from before this was recorded: unknown, 0
        return state

    def due(self, epoch_end: bool) -> bool:
        return epoch_end or time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        # The squeeze's cost so far travels with its progress, so a model squeezed across several processes
        # reports all of it (work lost to a kill after the last save is not counted: it made nothing).
        torch.save({**state, "key": self.key, "seconds": self.before + time.monotonic() - self._start}, buf)
        atomic_write_bytes(self.path, buf.getvalue())
        self._last = time.monotonic()

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _epoch(train: ImageSet, batch: int, g: torch.Generator, device, order: torch.Tensor | None, first: int):
    """(batch index, the epoch's order or None, images, labels) from batch `first` on; the same draws as
    data.iterate(shuffle=True, drop_last=True), and an in-memory set's order is handed out so that a save
    in the middle of the epoch can resume it."""
    if train.in_memory:
        order = torch.randperm(len(train), generator=g) if order is None else order
        for i in range(first, len(train) // batch):
            idx = order[i * batch:(i + 1) * batch]
            yield i, order, train.images[idx], train.labels[idx]
        return
    for i, (x, y) in enumerate(iterate(train, batch, shuffle=True, generator=g, drop_last=True, device=device)):
        yield i, None, x, y


def _fit(model: nn.Module, train: ImageSet, cfg: SqueezeConfig, device, seed: int, params, modules: dict,
         step_loss, name: str, resume: Resume | None) -> torch.Tensor | None:
    """The squeeze loop shared by SSL pretraining and supervised training: SGD with a warmed-up cosine over
    `cfg.epochs`; `step_loss(x, y, g, step, total)` is one batch's loss, its augmentations drawn from `g`
    (the generator that also shuffles, so one state holds all of the run's randomness). Resumes from and
    saves to `resume`; returns the last batch's loss (None when a finished run was resumed)."""
    g = torch.Generator().manual_seed(seed)
    opt = _sgd(params, cfg)
    batch = min(cfg.batch_size, len(train))
    per_epoch = _steps(len(train), batch)
    total = cfg.epochs * per_epoch
    step, order, loss = 0, None, None
    state = resume.load(device) if resume else None
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        g.set_state(state["generator"])
        step, order = state["step"], state["order"]
        log.info("%s: resuming at step %d of %d from %s", name, step, total, resume.path)
    model.train()
    with Progress(total, name, "step", initial=step) as bar:
        while step < total:
            epoch, first = divmod(step, per_epoch)
            for i, order, x, y in _epoch(train, batch, g, device, order if first else None, first):
                set_lr(opt, cosine_lr(cfg.lr, step, total, warmup=min(10, total // 10)))
                loss = step_loss(x.to(device, non_blocking=True), y, g, step, total)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1, epoch=epoch)
                end = i + 1 == per_epoch
                if resume and resume.due(end) and step < total and (end or order is not None):
                    resume.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "modules": {k: m.state_dict() for k, m in modules.items()},
                                 "generator": g.get_state(), "step": step, "order": None if end else order})
            order = None
    return loss


def pretrain_ssl(model: nn.Module, train: ImageSet, cfg: SqueezeConfig, device, seed: int,
                 resume: Resume | None = None) -> None:
    """Self-supervised pretraining (`cfg.method`, an objective of core.ssl) of `model`'s backbone in place.

    Its `fc` is untouched.
    """
    info = train.info
    objective = ssl.get(cfg.method)(model, model.num_features, cfg.temperature, device)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("fc.")] + objective.parameters()

    def step_loss(x, _y, g, step, total):
        v1 = ssl_view(x, info.image_size, cfg, info.mean, info.std, g)
        v2 = ssl_view(x, info.image_size, cfg, info.mean, info.std, g)
        with autocast(device):
            return objective.loss(model, v1, v2, step, total)

    loss = _fit(model, train, cfg, device, seed, trainable, objective.modules(), step_loss,
                f"squeeze {cfg.method}", resume)
    if loss is not None:
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


def train_supervised(model: nn.Module, train: ImageSet, cfg: SqueezeConfig, device, seed: int,
                     resume: Resume | None = None) -> None:
    info = train.info

    def step_loss(x, y, g, _step, _total):
        v = supervised_view(x, info.image_size, cfg, info.mean, info.std, g)
        with autocast(device):
            return F.cross_entropy(model(v), y.to(device, non_blocking=True))

    _fit(model, train, cfg, device, seed, model.parameters(), {}, step_loss, "squeeze supervised", resume)
    model.eval()


def squeeze(train: ImageSet, arch: str, width: float, cfg: SqueezeConfig, device="cpu", seed: int = 0,
            small_input: bool = True, resume: Resume | None = None) -> nn.Module:
    """Train a backbone + linear head on `train` with `cfg.method`; returns it in eval mode on `device`.

    With `resume`, the training goes on from the progress saved there (the linear probe, minutes, is not
    saved: it runs again)."""
    torch.manual_seed(seed)  # model initialisation
    model = create_model(arch, train.info.num_classes, width, small_input).to(device, memory_format=torch.channels_last)
    if cfg.method == SUPERVISED:
        train_supervised(model, train, cfg, device, seed, resume)
    else:
        pretrain_ssl(model, train, cfg, device, seed, resume)
        linear_probe(model, train, cfg, device, seed)
    model.eval()
    return model
