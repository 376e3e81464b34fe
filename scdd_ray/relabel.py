"""Relabel: the teacher's soft labels on exactly the crops the student sees.

FKD-style online relabelling: each step draws augmented (and mixed) crops of
the synthetic images; the teacher labels those very crops, so a crop that
shows mostly another image gets that image's label mass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import cutmix, mixup, normalize, random_flip, random_resized_crop, to_float
from .config import PosttrainConfig


def student_crops(images_u8: torch.Tensor, cfg: PosttrainConfig, image_size: int, mean, std,
                  g: torch.Generator) -> torch.Tensor:
    """Normalised augmented crops of a batch: random-resized-crop, flip, then CutMix/MixUp."""
    x = random_resized_crop(to_float(images_u8), image_size, cfg.crop_scale, g)
    if cfg.flip:
        x = random_flip(x, g)
    if cfg.mix != "none" and len(x) > 1 and float(torch.rand(1, generator=g)) < cfg.mix_prob:
        x = cutmix(x, g) if cfg.mix == "cutmix" else mixup(x, g)
    return normalize(x, mean, std)


@torch.no_grad()
def soft_labels(teacher: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """Teacher logits (float32) on the given crops; the teacher stays in eval mode."""
    teacher.eval()
    return teacher(crops).float()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
