"""Starting images chosen from real ones by the recovery model's confidence, one or several patches each
(RDED, arXiv 2312.03526: keep the real images, or crops of them, the model finds most typical of their class
-- its realism score, the negative cross entropy of the class -- and at low IPC stitch K x K of them into
one image, so each distilled image carries several real views).

Everything is a function of (run seed, class): every shard that holds a class sees the same ranking of
that class's patches, and IPC index j takes its own patches of it (ranks j*K*K onwards), so no patch starts
two images.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import ImageSet
from .augment import crop_boxes, normalize, resized_crop, to_float
from .configs import RecoverConfig

CROP_SCALE = (0.08, 1.0)  # RDED's random-resized crops: 8-100% of the image area, square
SCORE_BATCH = 256


def class_seed(run_seed: int, c: int) -> int:
    digest = hashlib.sha256(f"{run_seed}:init-class:{c}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def candidates(pool: list[int] | np.ndarray, size: int, crops: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """(image index of each candidate, its crop box (w, h, cx, cy) as image fractions): `size` images drawn
    without replacement from `pool` (all of it if smaller), each whole (`crops` 0) or as `crops` random
    square crops. A function of `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    pool = np.asarray(pool)
    order = torch.randperm(len(pool), generator=g)[:size].numpy()
    chosen = pool[np.sort(order)]  # in the data's order: the draw decides which, not where they sit
    if crops <= 0:
        return chosen, torch.tensor([[1.0, 1.0, 0.5, 0.5]]).expand(len(chosen), 4).clone()
    boxes = crop_boxes(len(chosen) * crops, CROP_SCALE, (1.0, 1.0), g)
    return np.repeat(chosen, crops), boxes


@torch.no_grad()
def realism(model: nn.Module, x: torch.Tensor, c: int, device) -> torch.Tensor:
    """RDED's realism score of each normalised image: the log-probability the model gives class `c`."""
    logits = model(x.to(device, memory_format=torch.channels_last)).float()
    return F.log_softmax(logits, dim=1)[:, c].cpu()


def crops_of(train: ImageSet, idx: np.ndarray, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """The [0, 1] crops `boxes` of training images `idx`, resized to `image_size` (each image read once)."""
    uniq, inverse = np.unique(idx, return_inverse=True)
    images = to_float(train.load(uniq))[torch.from_numpy(inverse.reshape(-1))]
    return resized_crop(images, boxes, image_size)


def class_ranking(model: nn.Module, train: ImageSet, c: int, cfg: RecoverConfig, image_size: int, mean, std,
                  run_seed: int, device) -> tuple[np.ndarray, torch.Tensor]:
    """Class `c`'s candidate patches as (image index, crop box), the one the model is most confident on
    first; each pooled image keeps only its best crop (as RDED)."""
    idx, boxes = candidates(train.indices_of_class(c), cfg.init_pool, cfg.init_crops, class_seed(run_seed, c))
    per_image = max(cfg.init_crops, 1)
    step = max(1, SCORE_BATCH // per_image) * per_image  # whole images per chunk: bounded memory
    score = torch.cat([realism(model, normalize(crops_of(train, idx[i:i + step], boxes[i:i + step], image_size),
                                                mean, std), c, device) for i in range(0, len(idx), step)])
    score = score.view(-1, per_image)
    best = score.argmax(1)
    rows = torch.arange(len(best)) * per_image + best  # each image's best crop
    order = rows[torch.argsort(score.max(1).values, descending=True, stable=True)]
    return idx[order.numpy()], boxes[order]


def stitch(patches: torch.Tensor, k: int) -> torch.Tensor:
    """One image from k * k patches (k*k, C, H, W): patch q fills grid cell q (row-major), shrunk to the cell
    (cells of a side that k does not divide differ by a pixel)."""
    size = patches.shape[-1]
    edges = [round(i * size / k) for i in range(k + 1)]
    out = torch.zeros(patches.shape[1], size, size, dtype=patches.dtype)
    for q in range(k * k):
        r, s = divmod(q, k)
        h, w = edges[r + 1] - edges[r], edges[s + 1] - edges[s]
        part = patches[q:q + 1]
        if (h, w) != tuple(part.shape[-2:]):
            part = F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[:, edges[r]:edges[r + 1], edges[s]:edges[s + 1]] = part[0]
    return out


def start_image(train: ImageSet, ranking: tuple[np.ndarray, torch.Tensor], j: int, k: int, c: int,
                image_size: int) -> torch.Tensor:
    """IPC index `j`'s starting image of a class, in [0, 1]: its ranked patches j*k*k .. (j+1)*k*k - 1 (the
    best patches start the first images), stitched k x k."""
    idx, boxes = ranking
    lo, hi = j * k * k, (j + 1) * k * k
    if hi > len(idx):
        raise ValueError(f"class {c} has {len(idx)} candidate images to start from; IPC index {j} needs {hi} "
                         "(raise `recover.init_pool`, or the class has too few training images)")
    patches = crops_of(train, idx[lo:hi], boxes[lo:hi], image_size)
    return patches[0] if k == 1 else stitch(patches, k)


def confident_init(model: nn.Module, train: ImageSet, classes: list[int], ipc_indices: list[int],
                   cfg: RecoverConfig, image_size: int, mean, std, run_seed: int, device) -> torch.Tensor:
    """Normalised starting images for the rows (class, IPC index) of a shard. A process keeps each class's
    ranking (indices and boxes, small) on the model, so the shards of a class score its candidates once."""
    cache = model.__dict__.setdefault("_scdd_init_rankings", {})  # a plain attribute, not a submodule
    rows = []
    for c, j in zip(classes, ipc_indices):
        key = (c, run_seed, cfg.init_pool, cfg.init_crops, image_size, id(train))
        if key not in cache:  # the set is kept with its ranking: its id cannot name another set meanwhile
            cache[key] = (train, class_ranking(model, train, c, cfg, image_size, mean, std, run_seed, device))
        rows.append(start_image(train, cache[key][1], j, cfg.init_patches, c, image_size))
    return normalize(torch.stack(rows), mean, std)
