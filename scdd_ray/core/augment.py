"""Batched, differentiable image augmentations driven by an explicit generator.

Every random draw comes from a CPU `torch.Generator` the caller owns, so a
shard's result depends only on its seed, never on which process or device ran
it, and no global RNG state is touched. All ops work on whole batches (one
affine grid for all crops) because per-image PIL transforms dominate the cost
of small-image training on CPU.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` (drawn on the CPU) on `device` without a host sync.

    A copy from pageable host memory to a GPU waits for the GPU's queue to
    drain, so every small random draw moved that way stalls the loop; from
    pinned memory with non_blocking it is queued like a kernel. A no-op on CPU.
    """
    device = torch.device(device)
    if device.type == "cpu" or t.device.type != "cpu":
        return t.to(device)
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def crop_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Random-resized-crop boxes as (w, h, cx, cy) fractions of the image, shape (n, 4).

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); boxes are clipped
    to the image and centred uniformly where they fit.
    """
    area = _uniform(n, scale[0], scale[1], g)
    logr = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = w / 2 + torch.rand(n, generator=g) * (1 - w)
    cy = h / 2 + torch.rand(n, generator=g) * (1 - h)
    return torch.stack([w, h, cx, cy], dim=1)


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), per_batch: bool = False) -> torch.Tensor:
    """Random crop resized to `size` (bilinear), differentiable in `x`: one box per image, or one for
    the whole batch (`per_batch`, as torchvision's transform applied to a 4-D batch does)."""
    boxes = crop_boxes(1 if per_batch else x.shape[0], scale, ratio, g)
    return resized_crop(x, boxes.expand(x.shape[0], 4) if per_batch else boxes, size)


def padded_crop_boxes(n: int, size: int, pad: int, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding=pad) as (w, h, cx, cy) boxes: whole-image boxes shifted by whole pixels."""
    shift = torch.randint(-pad, pad + 1, (n, 2), generator=g).float() / size
    return torch.cat([torch.ones(n, 2), 0.5 + shift], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, fill: str = "reflection") -> torch.Tensor:
    """Crop each image to its (w, h, cx, cy) box (fractions) and resize to `size`; rows are independent.

    Outside the image the crop reflects it, or is black with `fill` "zeros"
    (the padding of a padded random crop)."""
    n = x.shape[0]
    b = to_device(boxes, x.device).float()
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = b[:, 0]
    theta[:, 1, 1] = b[:, 1]
    theta[:, 0, 2] = b[:, 2] * 2 - 1
    theta[:, 1, 2] = b[:, 3] * 2 - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=fill, align_corners=False)


def random_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5, per_batch: bool = False) -> torch.Tensor:
    """Horizontal flip of each image with probability p, or of the whole batch at once (`per_batch`)."""
    if per_batch:
        return x.flip(3) if float(torch.rand(1, generator=g)) < p else x
    mask = to_device(torch.rand(x.shape[0], generator=g) < p, x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


def random_roll(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Jitter: one cyclic shift in [0, max_shift] per axis for the whole batch (as the reference)."""
    if max_shift <= 0:
        return x
    dx, dy = torch.randint(0, max_shift + 1, (2,), generator=g).tolist()
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # torch.roll of a channels_last batch comes back NCHW when a shift is 0: roll the NHWC view
        # instead, so the layout (and a compiled step's graph) is the same every iteration.
        return torch.roll(x.permute(0, 2, 3, 1), shifts=(dx, dy), dims=(1, 2)).permute(0, 3, 1, 2)
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def color_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.4, p: float = 0.8,
                 gray_p: float = 0.2) -> torch.Tensor:
    """SimCLR-style brightness/contrast/saturation jitter and random grayscale on [0,1] images."""
    n = x.shape[0]
    dev = x.device
    apply = to_device(torch.rand(n, generator=g) < p, dev).view(-1, 1, 1, 1)
    bright = to_device(_uniform(n, 1 - strength, 1 + strength, g), dev).view(-1, 1, 1, 1)
    contrast = to_device(_uniform(n, 1 - strength, 1 + strength, g), dev).view(-1, 1, 1, 1)
    sat = to_device(_uniform(n, 1 - strength, 1 + strength, g), dev).view(-1, 1, 1, 1)
    y = x * bright
    m = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - m) * contrast + m
    gray = y.mean(dim=1, keepdim=True)
    y = (y - gray) * sat + gray
    y = torch.where(apply, y, x).clamp(0, 1)
    to_gray = to_device(torch.rand(n, generator=g) < gray_p, dev).view(-1, 1, 1, 1)
    return torch.where(to_gray, y.mean(dim=1, keepdim=True).expand_as(y), y)


def beta(alpha: float, g: torch.Generator) -> float:
    """One exact Beta(alpha, alpha) draw whose randomness comes from `g` alone."""
    seed = int(torch.randint(0, 2**62, (1,), generator=g).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cutmix_params(n: int, h: int, w: int, g: torch.Generator, alpha: float = 1.0):
    """The random part of CutMix: one box (y0, y1, x0, x1) for the batch and a partner permutation."""
    lam = beta(alpha, g)
    cut = math.sqrt(1 - lam)
    bw, bh = int(w * cut), int(h * cut)
    cx = int(torch.randint(0, w, (1,), generator=g).item())
    cy = int(torch.randint(0, h, (1,), generator=g).item())
    box = (max(cy - bh // 2, 0), min(cy + bh // 2, h), max(cx - bw // 2, 0), min(cx + bw // 2, w))
    return box, torch.randperm(n, generator=g)


def paste(x: torch.Tensor, partner: torch.Tensor, box) -> torch.Tensor:
    """CutMix given its parameters: `partner[i]`'s pixels inside `box` replace image i's."""
    y0, y1, x0, x1 = box
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    return out


def mixup_params(n: int, g: torch.Generator, alpha: float = 0.8):
    """The random part of MixUp: lambda ~ Beta(alpha, alpha) and a partner permutation."""
    lam = beta(alpha, g)
    return lam, torch.randperm(n, generator=g)


@functools.lru_cache(maxsize=64)
def _channel_stats(mean: tuple, std: tuple, dtype: torch.dtype, device: torch.device):
    # Built once per device: a fresh tensor from Python numbers every step is a host->GPU copy (and sync).
    m = torch.as_tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1)
    return m, s


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = _channel_stats(tuple(mean), tuple(std), x.dtype, x.device)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = _channel_stats(tuple(mean), tuple(std), x.dtype, x.device)
    return x * s + m


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255.0)


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    return (x01.clamp(0, 1) * 255.0).round().to(torch.uint8)
