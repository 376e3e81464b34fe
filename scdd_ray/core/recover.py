"""Recover: optimise noise into images the frozen backbone classifies as their
target class while their BatchNorm statistics match the stored ones.

Pure torch, no Ray: the engine calls `synthesize` once per shard.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.runtime import autocast
from .augment import denormalize, random_flip, random_resized_crop, random_roll, to_uint8
from .bn import BNMatch, bn_layers, parse_bn_weights
from .class_bn import ClassBNMatch
from .configs import RecoverConfig
from .schedules import cosine_lr, set_lr


@dataclass
class RecoverResult:
    images: torch.Tensor  # uint8 (N, 3, H, W) on CPU, the LAST iterate (as the authors keep)
    loss_ce: float
    loss_bn: float
    seconds: float
    history: list[tuple[int, float, float]]  # (iteration, ce, weighted bn) at a few points


def gray_to_rgb(x1: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Map a one-channel image normalised with channel 0's statistics to three normalised channels."""
    pixel = x1 * std[:, :1] + mean[:, :1]
    return (pixel - mean) / std


def recover_objective(model: nn.Module, bnm: BNMatch, device, xi: torch.Tensor, targets: torch.Tensor,
                      amp: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, weighted BN term) of one forward of the augmented batch `xi`."""
    with autocast(device, amp):
        logits = model(xi)
    return F.cross_entropy(logits.float(), targets), bnm.loss()


def compiled_objective(model: nn.Module, weights: list[float], normalize: str, device, amp: str, backend: str):
    """`recover_objective` through torch.compile (`backend`), built once per model, BN setting and device.

    Its BN hooks stay on the model for the model's life: a new BNMatch per
    shard would change what the graph closes over and recompile it for
    every shard (minutes each). Pass models that serve recover only.
    """
    cache = model.__dict__.setdefault("_scdd_compiled_objectives", {})  # a plain attribute, not a submodule
    key = (tuple(weights), normalize, str(device), amp, backend)
    if key not in cache:
        bnm = BNMatch(model, weights, normalize).__enter__()
        bnm.weights_on(device)  # copied before tracing: a copy made inside the trace would recompile the graph
        cache[key] = torch.compile(functools.partial(recover_objective, model, bnm, device, amp=amp),
                                   backend=backend)
    return cache[key]


class Recovery:
    """One batch of images being recovered: the images, their optimiser, and the step that moves them.

    `step` is one iteration: augment, forward, BN and cross-entropy terms,
    backward, Adam, clip. It reads no value back from the device (no host
    sync): the random draws are made on the CPU and travel as queued copies,
    and the losses stay device tensors until `result`. Every iteration feeds
    the model one shape in one memory format, so a compiled step is traced once.
    """

    def __init__(self, model: nn.Module, targets: torch.Tensor, cfg: RecoverConfig, mean, std, image_size: int,
                 seed: int, device="cpu", init: torch.Tensor | None = None, channels_last: bool | None = None,
                 log_every: int = 50, class_stats=None):
        self.t0 = time.perf_counter()
        self.cfg, self.image_size, self.log_every, self.mean, self.std = cfg, image_size, log_every, mean, std
        self.device = device = torch.device(device)
        if channels_last is None:
            channels_last = True  # measured faster for these convs on CPU as on GPU
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=self.fmt)  # the images' layout, whatever the caller built (a no-op if it matches)
        self.g = torch.Generator().manual_seed(seed)
        n = len(targets)
        self.m = m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        self.s = s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        lo, hi = (0 - m) / s, (1 - m) / s
        ch = 1 if cfg.grayscale else 3
        if init is None:
            x = torch.randn(n, ch, image_size, image_size, generator=self.g)
        else:
            x = init.float().clone()
            if cfg.grayscale:  # back to one channel: the pixel mean, normalised like channel 0
                pixel = (x.to(device) * s + m).mean(dim=1, keepdim=True)
                x = ((pixel - m[:, :1]) / s[:, :1]).cpu()
        self.x = x.to(device).contiguous(memory_format=self.fmt).requires_grad_(True)
        self.lo, self.hi = (lo[:, :1], hi[:, :1]) if cfg.grayscale else (lo, hi)
        self.targets = targets.to(device)
        weights = parse_bn_weights(cfg.bn_weights).resolve(len(bn_layers(model)))
        self.opt = torch.optim.Adam([self.x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
        self.history: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        if cfg.compile:
            self.objective = compiled_objective(model, weights, cfg.bn_normalize, device, cfg.amp,
                                                cfg.compile_backend)
            self.hooks = contextlib.nullcontext()
        else:
            self.hooks = BNMatch(model, weights, cfg.bn_normalize, cfg.bn_smoothing)
            self.objective = functools.partial(recover_objective, model, self.hooks, device, amp=cfg.amp)
        self.per_class = None  # category-aware matching (EDC), entered beside `hooks`
        if cfg.class_bn_coef > 0:
            if class_stats is None:
                raise ValueError("`recover.class_bn_coef` needs the recovery model's per-class BN statistics")
            self.per_class = ClassBNMatch(model, class_stats, self.targets, weights, cfg.bn_normalize,
                                          cfg.class_bn_form, cfg.bn_smoothing)

    def inputs(self) -> torch.Tensor:
        """This iteration's augmented batch, in the images' memory format."""
        cfg, g = self.cfg, self.g
        xi = gray_to_rgb(self.x, self.m, self.s) if cfg.grayscale else self.x
        per_batch = cfg.augment_per == "batch"
        if cfg.crop_scale is not None:
            xi = random_resized_crop(xi, self.image_size, cfg.crop_scale, g, per_batch=per_batch)
        if cfg.flip:
            xi = random_flip(xi, g, per_batch=per_batch)
        return random_roll(xi, cfg.jitter, g).contiguous(memory_format=self.fmt)  # a no-op unless a crop changed it

    def step(self, it: int) -> None:
        cfg = self.cfg
        set_lr(self.opt, cosine_lr(cfg.lr, it, cfg.iterations))
        xi, targets = self.inputs(), self.targets
        if cfg.compile:  # one graph for every batch size: a short last shard reuses it instead of recompiling
            torch._dynamo.maybe_mark_dynamic(xi, 0)
            torch._dynamo.maybe_mark_dynamic(targets, 0)
        ce, bn = self.objective(xi, targets)
        loss = ce + cfg.bn_coef * bn
        if self.per_class is not None:
            loss = loss + cfg.class_bn_coef * self.per_class.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch.maximum(torch.minimum(self.x, self.hi, out=self.x), self.lo, out=self.x)
        # Keep device tensors; converting every step would force a host sync.
        if it % self.log_every == 0 or it == cfg.iterations - 1:
            self.history.append((it, ce.detach(), bn.detach()))

    def result(self) -> RecoverResult:
        """The last iterate as uint8 images on the CPU, and the losses (the one read-back of the batch)."""
        with torch.no_grad():
            final = gray_to_rgb(self.x, self.m, self.s) if self.cfg.grayscale else self.x
            images = to_uint8(denormalize(final.float(), self.mean, self.std)).cpu().contiguous()
        hist = [(i, float(c), float(b)) for i, c, b in self.history]
        return RecoverResult(images=images, loss_ce=hist[-1][1], loss_bn=hist[-1][2],
                             seconds=time.perf_counter() - self.t0, history=hist)


def synthesize(model: nn.Module, targets: torch.Tensor, cfg: RecoverConfig, mean, std, image_size: int, seed: int,
               device="cpu", init: torch.Tensor | None = None, channels_last: bool | None = None,
               log_every: int = 50, on_step=None, class_stats=None) -> RecoverResult:
    """Synthesise one image per entry of `targets`, all optimised as one batch.

    model:  frozen backbone + head (eval mode, no parameter gradients).
    init:   optional normalised starting images (N, 3, H, W); Gaussian noise otherwise.
    on_step: optional callback(iteration) for progress and fault-injection hooks.
    class_stats: the model's per-class BN statistics (core.class_bn), matched with `cfg.class_bn_coef`.
    Randomness comes only from `seed`, so the same seed and targets give the
    same images whichever process runs them. The model is put in the images'
    memory format (channels_last unless told otherwise) if it is not in it.
    """
    rec = Recovery(model, targets, cfg, mean, std, image_size, seed, device, init, channels_last, log_every,
                   class_stats)
    with rec.hooks, (rec.per_class or contextlib.nullcontext()):
        for it in range(cfg.iterations):
            rec.step(it)
            if on_step is not None:
                on_step(it)
    return rec.result()
