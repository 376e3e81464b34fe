"""Relabel: the teacher's soft labels on exactly the crops the student sees.

FKD-style online relabelling: each step draws augmented (and mixed) crops of
the synthetic images; the teacher labels those very crops, so a crop that
shows mostly another image gets that image's label mass.

The random part of a batch's crops is drawn once, for the whole global batch,
as a `CropPlan`; `make_crops` then builds the crops of any subset of its rows.
So a Ray Train worker that owns rows 13..24 of a 25-image global batch builds
exactly the crops a single worker would build for those rows, and stored soft
labels (one row per crop, with its plan) fit any number of workers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import (
    crop_boxes,
    cutmix_params,
    mixup_params,
    normalize,
    padded_crop_boxes,
    paste,
    resized_crop,
    to_device,
    to_float,
)
from .configs import PosttrainConfig

MIX_CODES = {"none": 0, "cutmix": 1, "mixup": 2}
CROPS = ("resized", "padded")
PAD = 4  # pixels of a padded crop, as the authors' CIFAR scripts


@dataclass
class CropPlan:
    """Every random choice behind one global batch's crops.

    boxes: (B, 4) crop boxes (w, h, cx, cy) as image fractions; fill: what a
    box sees outside the image ("reflection", or "zeros" for padded crops);
    flip: (B,) horizontal flips; mix: 'none', 'cutmix' or 'mixup' for this
    batch; partner: (B,) the row each crop is mixed with; box: CutMix box
    (y0, y1, x0, x1) in output pixels; lam: MixUp weight of the crop itself.
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    mix: str = "none"
    partner: torch.Tensor | None = None
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    lam: float = 1.0
    fill: str = "reflection"

    def __len__(self) -> int:
        return len(self.boxes)

    def to(self, device) -> "CropPlan":
        """The plan's tensors on `device`, copied without a host sync (augment.to_device)."""
        return dataclasses.replace(self, boxes=to_device(self.boxes, device), flip=to_device(self.flip, device),
                                   partner=None if self.partner is None else to_device(self.partner, device))


def plan_crops(n: int, cfg: PosttrainConfig, image_size: int, g: torch.Generator) -> CropPlan:
    """Draw the crops of a batch of `n` images from `g` (the draw order is part of the contract)."""
    if cfg.crop == "padded":  # the authors' CIFAR post-training: RandomCrop(size, padding=4)
        boxes = padded_crop_boxes(n, image_size, PAD, g)
    else:
        boxes = crop_boxes(n, cfg.crop_scale, (3 / 4, 4 / 3), g)
    flip = torch.rand(n, generator=g) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
    plan = CropPlan(boxes, flip, fill=crop_fill(cfg.crop))
    if cfg.mix != "none" and n > 1 and float(torch.rand(1, generator=g)) < cfg.mix_prob:
        plan.mix = cfg.mix
        if cfg.mix == "cutmix":
            plan.box, plan.partner = cutmix_params(n, image_size, image_size, g)
        else:
            plan.lam, plan.partner = mixup_params(n, g)
    return plan


def crop_fill(crop: str) -> str:
    return "zeros" if crop == "padded" else "reflection"


def _crop_rows(images_u8: torch.Tensor, rows: torch.Tensor, plan: CropPlan, image_size: int) -> torch.Tensor:
    x = resized_crop(to_float(images_u8[rows.to(images_u8.device)]), plan.boxes[rows], image_size, plan.fill)
    flip = plan.flip[rows].to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def make_crops(images_u8: torch.Tensor, plan: CropPlan, image_size: int, mean, std,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised crops of rows `rows` (default: all) of the batch `images_u8` (B, C, H, W) under `plan`.

    Each row depends only on itself and its mixing partner, so any subset of
    rows gives the same crops as the whole batch would.
    """
    if rows is None:
        rows = torch.arange(len(plan))
    x = _crop_rows(images_u8, rows, plan, image_size)
    if plan.mix != "none":
        other = _crop_rows(images_u8, plan.partner[rows], plan, image_size)
        x = paste(x, other, plan.box) if plan.mix == "cutmix" else plan.lam * x + (1 - plan.lam) * other
    return normalize(x, mean, std)


@torch.no_grad()
def soft_labels(teacher: nn.Module, crops: torch.Tensor, bn: str = "eval") -> torch.Tensor:
    """Teacher logits (float32) on the given crops. `bn` eval: BatchNorm normalises with the teacher's running
    statistics; train: with the crops' own batch statistics (the authors' CIFAR post-training never puts its
    teacher in eval mode). The teacher's weights are frozen either way."""
    teacher.train(bn == "train")
    with torch.no_grad():
        return teacher(crops).float()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def mix_weight(plan: CropPlan, image_size: int) -> float:
    """How much of each mixed crop is its own image: the label weight hard-label training gives it."""
    if plan.mix == "cutmix":
        y0, y1, x0, x1 = plan.box
        return 1.0 - (y1 - y0) * (x1 - x0) / (image_size * image_size)
    return plan.lam if plan.mix == "mixup" else 1.0


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor,
                    lam: float) -> torch.Tensor:
    """Cross entropy against the crop's mixed label: `lam` on its own class, the rest on its partner's."""
    logp = F.log_softmax(logits.float(), dim=1)
    own = logp.gather(1, labels.view(-1, 1)).squeeze(1)
    other = logp.gather(1, partner_labels.view(-1, 1)).squeeze(1)
    return -(lam * own + (1.0 - lam) * other).mean()


# --- stored soft labels ----------------------------------------------------------

def topk_probs(teacher_logits: torch.Tensor, temperature: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest probabilities at `temperature`, (values, class indices), largest first."""
    p = F.softmax(teacher_logits.float() / temperature, dim=1)
    v, i = p.topk(min(k, p.shape[1]), dim=1)
    return v, i


def logits_from_topk(values: torch.Tensor, indices: torch.Tensor, num_classes: int,
                     temperature: float) -> torch.Tensor:
    """Stand-in teacher logits whose softmax at `temperature` is the stored distribution.

    The k stored probabilities are kept; the mass they leave is spread evenly
    over the other classes (exact when k equals the class count).
    """
    values = values.float()
    n, k = values.shape
    rest = (1.0 - values.sum(dim=1, keepdim=True)).clamp(min=0.0)
    p = (rest / max(num_classes - k, 1)).expand(n, num_classes).clone()
    p.scatter_(1, indices.long(), values)
    p = p / p.sum(dim=1, keepdim=True)
    return temperature * torch.log(p.clamp(min=1e-12))


@dataclass
class StepBatch:
    """One global batch: image indices, crop plan, and stored teacher targets (None: run the teacher)."""

    idx: torch.Tensor
    plan: CropPlan
    targets: torch.Tensor | None = None
