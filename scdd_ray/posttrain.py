"""Post-train: a fresh student learns from the distilled images with the
teacher's soft labels on every augmented crop; top-1 is measured on the REAL
test split.

`train_student` is a plain function of tensors and a config so it runs in
process (tests, `distill` on one worker) and inside a Ray Train worker alike.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import PosttrainConfig
from .data import ImageSet
from .evaluation import top1
from .models import autocast, create_model, frozen
from .progress import Progress
from .relabel import kd_loss, soft_labels, student_crops
from .schedules import cosine_lr, set_lr

log = logging.getLogger("scdd_ray")


@dataclass
class PosttrainResult:
    top1: float
    seconds: float
    student: nn.Module
    history: list[dict] = field(default_factory=list)


def make_optimizer(model: nn.Module, cfg: PosttrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def steps_per_epoch(n: int, batch: int) -> int:
    # Drop the last partial batch when there is more than one: a batch of one
    # or two images gives degenerate BatchNorm statistics in the student.
    return max(1, n // batch) if n > batch else 1


def train_student(images: torch.Tensor, teacher: nn.Module, test: ImageSet, cfg: PosttrainConfig, *,
                  image_size: int, mean, std, num_classes: int, small_input: bool = True, device="cpu",
                  seed: int = 0) -> PosttrainResult:
    """Train `cfg.student` from scratch on uint8 `images` (N, 3, H, W) with KD from `teacher`."""
    t0 = time.perf_counter()
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # student initialisation
    student = create_model(cfg.student, num_classes, cfg.student_width, small_input)
    student = student.to(device, memory_format=torch.channels_last)
    teacher = frozen(teacher.to(device, memory_format=torch.channels_last))
    opt = make_optimizer(student, cfg)
    n = len(images)
    batch = min(cfg.batch_size, n)
    per_epoch = steps_per_epoch(n, batch)
    total = cfg.epochs * per_epoch
    images = images.to(device)
    history: list[dict] = []
    step = 0
    student.train()
    with Progress(cfg.epochs, "posttrain", "epoch") as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=g).to(device)
            running = torch.zeros((), device=device)
            for b in range(per_epoch):
                idx = order[b * batch:(b + 1) * batch]
                set_lr(opt, cosine_lr(cfg.lr, step, total))
                crops = student_crops(images[idx], cfg, image_size, mean, std, g)
                target = soft_labels(teacher, crops)
                with autocast(device):
                    logits = student(crops)
                loss = kd_loss(logits, target, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += loss.detach()
                step += 1
            rec = {"epoch": epoch + 1, "loss": None}
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                rec["loss"] = float(running) / per_epoch
                rec["top1"] = top1(student, test, mean, std, device)
                history.append(rec)
            bar.update(1)
    acc = top1(student, test, mean, std, device)
    history.append({"epoch": cfg.epochs, "loss": float(running) / per_epoch, "top1": acc})
    log.info("posttrain: %d epochs, top-1 on the real test split %.2f%%", cfg.epochs, acc)
    return PosttrainResult(top1=acc, seconds=time.perf_counter() - t0, student=student.cpu(), history=history)
