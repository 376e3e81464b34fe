"""Post-training, the one training loop: a fresh student learns from the
distilled images with the teacher's soft labels on every augmented crop.

`PostTrainer` holds a student, its optimiser and where it is, and `fit` runs
the epochs; Ray Train workers (scdd_ray.dist.train), Tune trials
(scdd_ray.dist.tune) and in-process callers all train through it and differ
only in what they do at the end of an epoch and in how the student is wrapped
(DDP). `run_epoch` / `train_step` are the maths of one epoch / one step.

One global batch of `batch_size` images per step whatever the worker count:
every worker draws the same image order and crop plan (seeded by run seed and
epoch), then builds, labels and learns from only its slice of the batch. With
N workers each step therefore sees the same crops as with one; DDP averages
the gradients (each worker's loss is weighted by its share of the batch, so
uneven splits such as 13 + 12 stay exact). What differs is BatchNorm: each
worker normalises with the statistics of its own slice. With
`batch_per_worker` the global batch is `batch_size` x workers instead (each
worker's slice is `batch_size`, the lr follows `scaled_lr`).

Every random draw is a function of (seed, epoch), so a run resumed from the
checkpoint of epoch k continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..data import DatasetInfo, ImageSet
from ..errors import ConfigError, Diverged, StoreError
from ..models import Checkpoint, adapt_inputs, autocast, create_model, frozen
from ..store import SOFT_FORMAT, SOFT_META, read_soft_labels
from .augment import to_device
from .configs import PosttrainConfig
from .relabel import (MIX_CODES, CropPlan, crop_fill, hard_label_loss, kd_loss, logits_from_topk, make_crops, mix_weight,
                      plan_crops, soft_labels, topk_probs)
from .schedules import cosine_lr, set_lr

log = logging.getLogger("scdd_ray")
STATE_FILE = "state.pt"
MIX_NAMES = {v: k for k, v in MIX_CODES.items()}


@dataclass
class PosttrainResult:
    top1: float
    seconds: float
    student_state: dict
    history: list[dict] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    trained_epochs: list[int] = field(default_factory=list)  # epochs trained, over every attempt
    startup_seconds: float | None = None  # Ray Train start-up: driver call -> first worker in its loop
    resumed_from: int = 0  # epoch of the checkpoint this call started from (0: fresh)
    num_workers: int = 1


def make_optimizer(model: nn.Module, cfg: PosttrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def steps_per_epoch(n: int, batch: int) -> int:
    # Drop the last partial batch when there is more than one: a batch of one
    # or two images gives degenerate BatchNorm statistics in the student.
    return max(1, n // batch) if n > batch else 1


def checkpoint_every(cfg: PosttrainConfig) -> int:
    return cfg.checkpoint_every or max(1, cfg.epochs // 20)


def global_batch(cfg: PosttrainConfig, n: int, world: int = 1) -> int:
    """Images per step over all workers: `batch_size` (or `batch_size` per worker with
    `batch_per_worker`), at most the set's size."""
    return min(cfg.batch_size * (world if cfg.batch_per_worker else 1), n)


def scaled_lr(cfg: PosttrainConfig, world: int = 1) -> float:
    """The learning rate of a `batch_per_worker` run on `world` workers: the global batch is `world`
    times larger, so SGD's lr grows `world` times (the linear rule, Goyal et al. 2017) and AdamW's
    sqrt(world) times (the square-root rule of adaptive optimisers, Malladi et al. 2022)."""
    if not cfg.batch_per_worker:
        return cfg.lr
    return cfg.lr * (world if cfg.optimizer == "sgd" else world ** 0.5)


def derive_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def rank_rows(batch: int, rank: int, world: int) -> tuple[torch.Tensor, float]:
    """This worker's rows of a global batch and the weight of its mean loss (exact DDP average)."""
    base, extra = divmod(batch, world)
    start = rank * base + min(rank, extra)
    size = base + (1 if rank < extra else 0)
    return torch.arange(start, start + size), size * world / batch


@dataclass
class StepBatch:
    """One global batch: image indices, crop plan, and stored teacher targets (None: run the teacher)."""

    idx: torch.Tensor
    plan: CropPlan
    targets: torch.Tensor | None = None


def epoch_batches(n: int, cfg: PosttrainConfig, image_size: int, seed: int, epoch: int,
                  world: int = 1) -> list[StepBatch]:
    """The image order and crop plans of one epoch; a function of (seed, epoch) only
    (and of the worker count with `batch_per_worker`)."""
    batch = global_batch(cfg, n, world)
    g = torch.Generator().manual_seed(derive_seed(seed, "posttrain-epoch", epoch))
    order = torch.randperm(n, generator=g)
    out = []
    for s in range(steps_per_epoch(n, batch)):
        idx = order[s * batch:(s + 1) * batch]
        out.append(StepBatch(idx, plan_crops(len(idx), cfg, image_size, g)))
    return out


def stored_batches(root: str, epoch: int, num_classes: int, temperature: float,
                   fill: str = "reflection") -> list[StepBatch]:
    """One epoch's batches rebuilt from stored soft labels (crop plans and teacher top-k)."""
    rows = read_soft_labels(root, epoch)
    out = []
    for s in np.unique(rows["step"]):
        sel = np.flatnonzero(rows["step"] == s)
        r = {k: v[sel] for k, v in rows.items()}
        if not np.array_equal(r["slot"], np.arange(len(sel))):
            raise StoreError(f"{root}: epoch {epoch + 1} step {int(s)} lacks some crops")
        boxes = torch.from_numpy(np.stack([r["box_w"], r["box_h"], r["box_cx"], r["box_cy"]], 1).astype(np.float32))
        plan = CropPlan(boxes, torch.from_numpy(r["flip"].astype(bool)), MIX_NAMES[int(r["mix"][0])],
                        torch.from_numpy(r["partner"].astype(np.int64)),
                        tuple(int(r[c][0]) for c in ("cut_y0", "cut_y1", "cut_x0", "cut_x1")), float(r["lam"][0]),
                        fill)
        targets = logits_from_topk(torch.from_numpy(r["topk_prob"].astype(np.float32)),
                                   torch.from_numpy(r["topk_index"].astype(np.int64)), num_classes, temperature)
        out.append(StepBatch(torch.from_numpy(r["image"].astype(np.int64)), plan, targets))
    return out


def soft_label_rows(epoch: int, step: int, sb: StepBatch, rows: torch.Tensor, target_logits: torch.Tensor,
                    temperature: float, k: int) -> dict:
    """Stored-soft-label columns for this worker's rows of one step."""
    p = sb.plan
    n = len(rows)
    v, i = topk_probs(target_logits, temperature, k)
    partner = p.partner[rows] if p.partner is not None else rows
    b = p.boxes[rows]
    full = lambda val, dt: np.full(n, val, dt)  # noqa: E731
    return {"epoch": full(epoch, np.int32), "step": full(step, np.int32), "slot": rows.numpy().astype(np.int32),
            "image": sb.idx[rows].numpy().astype(np.int32),
            "box_w": b[:, 0].numpy(), "box_h": b[:, 1].numpy(), "box_cx": b[:, 2].numpy(), "box_cy": b[:, 3].numpy(),
            "flip": p.flip[rows].numpy(), "mix": full(MIX_CODES[p.mix], np.int8),
            "partner": partner.numpy().astype(np.int32),
            "cut_y0": full(p.box[0], np.int16), "cut_y1": full(p.box[1], np.int16),
            "cut_x0": full(p.box[2], np.int16), "cut_x1": full(p.box[3], np.int16),
            "lam": full(p.lam, np.float32),
            "topk_index": i.cpu().numpy().astype(np.int16), "topk_prob": v.cpu().numpy().astype(np.float16)}


class EncodedSet:
    """A distilled set kept encoded (store.EncodedImages) by a trainer on `device`.

    Each step decodes only the images this worker crops, so a worker holds the
    encoded bytes plus one batch instead of the whole decoded set. The crops
    are exactly those of the decoded set: the same rows, the same pixels.
    """

    def __init__(self, encoded, device):
        self.encoded, self.device = encoded, torch.device(device)

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, idx: torch.Tensor, rows: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """uint8 images of the global batch `idx` on the device: rows `rows` and their mixing partners
        decoded, the others (which `make_crops` never reads for these rows) left zero."""
        need = rows if plan.mix == "none" else torch.unique(torch.cat([rows, plan.partner[rows]]))
        decoded = self.encoded.decode(idx[need].tolist())
        out = torch.zeros((len(idx),) + tuple(decoded.shape[1:]), dtype=torch.uint8)
        out[need] = decoded
        return to_device(out, self.device)


def step_images(images, sb: StepBatch, rows: torch.Tensor) -> torch.Tensor:
    """The uint8 images of step `sb` on the training device, from a decoded set or an `EncodedSet`."""
    if isinstance(images, EncodedSet):
        return images.batch(sb.idx, rows, sb.plan)
    return images[to_device(sb.idx, images.device)]


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA, where it pays. On CPU it does not, and torch 2.14.1 corrupts memory
    (SIGSEGV / double free) training 8-channel (width 0.125) convs in channels_last with 2 threads."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def train_step(student: nn.Module, teacher: nn.Module | None, opt: torch.optim.Optimizer, images: torch.Tensor,
               sb: StepBatch, rows: torch.Tensor, weight: float, cfg: PosttrainConfig, image_size: int, mean, std,
               scaler=None, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimisation step on this worker's `rows` of the global batch `sb`.

    The teacher labels the very crop tensor the student is fed (after
    random-resized-crop, flip and CutMix/MixUp). With `labels` (the images'
    classes, on CPU) the student learns them instead, by cross entropy with
    mixed crops weighted by how much of each image they show (no teacher).
    Returns (weighted loss, teacher logits or None).
    """
    device = images.device
    # The step's random draws (CPU) travel as queued copies: no host sync inside the loop.
    rows_on = to_device(rows, device)
    crops = make_crops(step_images(images, sb, rows), sb.plan.to(device), image_size, mean, std, rows_on)
    crops = crops.contiguous(memory_format=memory_format(device))
    with autocast(device, cfg.amp):
        if labels is not None:
            target = None
        elif sb.targets is None:
            target = soft_labels(teacher, crops)
        else:
            target = to_device(sb.targets[rows], device)
        logits = student(crops)
    if labels is None:
        loss = kd_loss(logits, target, cfg.temperature) * weight
    else:
        partner = sb.plan.partner[rows] if sb.plan.partner is not None else rows
        loss = hard_label_loss(logits, labels[sb.idx[rows]].to(device), labels[sb.idx[partner]].to(device),
                               mix_weight(sb.plan, image_size)) * weight
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss.detach(), target


def run_epoch(student, teacher, opt, images: torch.Tensor, batches: list[StepBatch], rows: torch.Tensor,
              weight: float, cfg: PosttrainConfig, image_size: int, mean, std, *, step: int, total_steps: int,
              scaler=None, on_step=None, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Train one epoch; returns (sum of this worker's weighted step losses, global step after it)."""
    running = torch.zeros((), device=images.device)
    for s, sb in enumerate(batches):
        set_lr(opt, cosine_lr(cfg.lr, step, total_steps))
        loss, target = train_step(student, teacher, opt, images, sb, rows, weight, cfg, image_size, mean, std,
                                  scaler, labels)
        running += loss
        if on_step is not None:
            on_step(s, sb, target)
        step += 1
    return running, step




def build_teacher(ckpt: Checkpoint, info: DatasetInfo, device) -> nn.Module:
    """The frozen relabelling teacher, fed inputs normalised with the dataset's statistics."""
    device = torch.device(device)
    return frozen(adapt_inputs(ckpt.build(), ckpt, info).to(device, memory_format=memory_format(device)))


class PostTrainer:
    """One post-train of one rank: the student, its optimiser, where it is, and the epoch loop.

    images: the distilled set (uint8, on its device, or an `EncodedSet`); teacher: the frozen
    relabelling model, or None with `stored` soft labels (a directory written
    by a post-train that stored them), which are read instead, or with
    `cfg.labels` "hard", where the student learns `labels` (the images'
    classes) by cross entropy. Every random draw is a
    function of (seed, epoch), so a trainer restored from `state_dict()` after
    epoch k continues exactly as the uninterrupted run would.
    """

    def __init__(self, cfg: PosttrainConfig, images: torch.Tensor, teacher: nn.Module | None, info: DatasetInfo, *,
                 image_size: int, small_input: bool, seed: int, rank: int = 0, world: int = 1,
                 stored: str | None = None, labels: torch.Tensor | None = None):
        if cfg.labels == "hard" and labels is None:
            raise ValueError("hard-label post-training needs the images' labels")
        cfg = dataclasses.replace(cfg, lr=scaled_lr(cfg, world))
        self.cfg, self.images, self.teacher, self.info = cfg, images, teacher, info
        self.labels = labels.cpu().long() if cfg.labels == "hard" else None
        self.image_size, self.seed, self.stored, self.world = image_size, seed, stored, world
        self.device = images.device
        n = len(images)
        batch = global_batch(cfg, n, world)
        self.total_steps = cfg.epochs * steps_per_epoch(n, batch)
        self.rows, self.weight = rank_rows(batch, rank, world)
        torch.manual_seed(seed)  # student initialisation, identical on every rank
        self.student = create_model(cfg.student, info.num_classes, cfg.student_width, small_input)
        self.student = self.student.to(self.device, memory_format=memory_format(self.device))
        self.model = self.student  # what trains: the student, or a DDP wrapper of it
        self.opt = make_optimizer(self.student, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" and cfg.amp == "fp16" else None
        self.state = {"epoch": 0, "step": 0, "history": [], "trained_epochs": [], "attempts": 0}

    def state_dict(self) -> dict:
        """Plain tensors and numbers: everything to resume from."""
        return {**self.state, "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, saved: dict) -> None:
        saved = dict(saved)
        self.student.load_state_dict(saved.pop("student"))
        self.opt.load_state_dict(saved.pop("optimizer"))
        scaler = saved.pop("scaler", None)
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(scaler)
        self.state.update(saved)

    def batches(self, epoch: int) -> list[StepBatch]:
        if self.stored:
            return stored_batches(self.stored, epoch, self.info.num_classes, self.cfg.temperature,
                                  crop_fill(self.cfg.crop))
        return epoch_batches(len(self.images), self.cfg, self.image_size, self.seed, epoch, self.world)

    def fit(self, on_epoch=None, on_step=None) -> None:
        """Train from the current epoch to `cfg.epochs`.

        on_epoch(epoch, running, num_steps) after each epoch (1-based epoch;
        `running`: the sum of this rank's weighted step losses, a tensor);
        on_step(epoch, step_in_epoch, step_batch, teacher_targets) after each step.
        """
        cfg = self.cfg
        self.model.train()
        for epoch in range(self.state["epoch"], cfg.epochs):
            batches = self.batches(epoch)
            hook = None if on_step is None else (lambda s, sb, target, _e=epoch: on_step(_e, s, sb, target))
            running, step = run_epoch(self.model, self.teacher, self.opt, self.images, batches, self.rows,
                                      self.weight, cfg, self.image_size, self.info.mean, self.info.std,
                                      step=self.state["step"], total_steps=self.total_steps, scaler=self.scaler,
                                      on_step=hook, labels=self.labels)
            if not bool(torch.isfinite(running)):  # one check an epoch: no host sync per step
                raise Diverged(f"post-train stopped at epoch {epoch + 1}: its loss is {float(running):g}; the "
                               "teacher's outputs or the post-train settings (`posttrain.lr`, "
                               "`posttrain.temperature`) make it diverge; checkpoints of earlier epochs are kept")
            self.state["epoch"], self.state["step"] = epoch + 1, step
            self.state["trained_epochs"].append(epoch + 1)
            if on_epoch is not None:
                on_epoch(epoch + 1, running, len(batches))

    def lr(self) -> float:
        return cosine_lr(self.cfg.lr, self.state["step"], self.total_steps)


# --- a post-train job and its stored soft labels ----------------------------------------

@dataclass
class PosttrainJob:
    """Everything a post-train needs, checked by the caller."""

    source: str  # a distilled directory: manifest + shards, bare *.parquet, or reference ImageFolder
    images_digest: str
    num_images: int
    teacher: Checkpoint
    test: ImageSet
    info: DatasetInfo
    cfg: PosttrainConfig
    image_size: int
    small_input: bool
    seed: int = 0
    soft_labels: str | None = None  # read stored soft labels from this directory instead of running the teacher
    store_soft_labels: str | None = None  # write the teacher's top-k on every crop here
    topk: int = 10

    def fingerprint(self) -> str:
        """Everything that decides the student; placement and checkpoint frequency are left out."""
        cfg = dataclasses.asdict(self.cfg)
        cfg.pop("checkpoint_every", None)
        for key, default in (("labels", "soft"), ("crop", "resized")):  # added later: left out at their
            if cfg[key] == default:  # defaults so earlier runs keep resuming
                del cfg[key]
        if not cfg["batch_per_worker"]:  # the default leaves the fingerprints of earlier runs unchanged
            cfg.pop("batch_per_worker")
        teacher = hashlib.sha256()
        for k_, v in sorted(self.teacher.state_dict.items()):
            teacher.update(k_.encode())
            teacher.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        keep = {"cfg": cfg, "images": self.images_digest, "teacher": teacher.hexdigest()[:16],
                "test": [self.info.name, self.image_size], "seed": self.seed, "soft_labels": bool(self.soft_labels)}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def batch(self, world: int = 1) -> int:
        """The global batch on `world` workers (`global_batch`)."""
        return global_batch(self.cfg, self.num_images, world)


def soft_label_meta(job: PosttrainJob, complete: bool, world: int = 1) -> dict:
    """What training from stored labels (`soft_labels`) checks first."""
    batch = job.batch(world)
    return {"format": SOFT_FORMAT, "complete": complete, "images_digest": job.images_digest,
            "num_images": job.num_images, "num_classes": job.info.num_classes, "temperature": job.cfg.temperature,
            "topk": min(job.topk, job.info.num_classes), "epochs": job.cfg.epochs, "batch_size": batch,
            "steps_per_epoch": steps_per_epoch(job.num_images, batch), "seed": job.seed,
            "crop_scale": list(job.cfg.crop_scale), "crop": job.cfg.crop, "flip": job.cfg.flip, "mix": job.cfg.mix,
            "mix_prob": job.cfg.mix_prob, "image_size": job.image_size}


def check_soft_labels(root: str, cfg: PosttrainConfig, digest: str, num_classes: int, num_images: int,
                      world: int = 1) -> None:
    """Stored soft labels must be complete and made for these images, classes, temperature and batch."""
    path = os.path.join(root, SOFT_META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise ConfigError("soft_labels", f"{root} holds no stored soft labels ({SOFT_META} missing or unreadable)") from None
    if meta.get("format") != SOFT_FORMAT or not meta.get("complete"):
        raise ConfigError("soft_labels", f"{root} is incomplete (its post-train did not finish)")
    if meta.get("images_digest") != digest:
        raise ConfigError("soft_labels", f"{root} labels other images than `distilled` holds")
    for key, want, fld in (("num_classes", num_classes, "teacher"),
                           ("temperature", cfg.temperature, "posttrain.temperature"),
                           ("batch_size", global_batch(cfg, num_images, world), "posttrain.batch_size"),
                           ("crop", cfg.crop, "posttrain.crop")):
        if meta.get(key, "resized" if key == "crop" else None) != want:
            raise ConfigError(fld, f"{root} was stored with {key} {meta.get(key)}, this run uses {want}")
    if cfg.epochs > meta.get("epochs", 0):
        raise ConfigError("posttrain.epochs", f"{root} holds {meta.get('epochs', 0)} epochs of soft labels, "
                                              f"{cfg.epochs} asked for")
