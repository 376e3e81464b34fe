"""Post-training, the one training loop: a fresh student learns from the
distilled images with the teacher's soft labels on every augmented crop.

`PostTrainer` holds a student, its optimiser and where it is, and `fit` runs
the epochs; Ray Train workers (scdd_ray.dist.posttrain), Tune trials
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
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..data import DatasetInfo
from ..errors import Diverged
from ..models.adapt import adapt_inputs
from ..models.factory import create_model
from ..models.runtime import autocast, frozen
from ..store.encoded import EncodedImages
from .augment import to_device
from .committee import Committee, members
from .configs import PosttrainConfig
from .ema import averaged_model, ema_decay, ema_update, init_average
from .relabel import StepBatch, crop_fill, hard_label_loss, kd_loss, make_crops, mix_weight, plan_crops, soft_labels
from .schedules import cosine_lr, set_lr
from .soft_labels import stored_batches

log = logging.getLogger("scdd_ray")


@dataclass
class PosttrainResult:
    top1: float
    seconds: float | None  # the run's, over every process that trained it (None: a run from before this was kept)
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


def step_images(images, sb: StepBatch, rows: torch.Tensor) -> torch.Tensor:
    """The uint8 images of step `sb` on the training device, from a decoded set or an encoded one
    (store.encoded.EncodedImages): of those, only this worker's `rows` and their mixing partners are
    decoded (`make_crops` reads no other row for them)."""
    if isinstance(images, EncodedImages):
        need = rows if sb.plan.mix == "none" else torch.unique(torch.cat([rows, sb.plan.partner[rows]]))
        return images.gather(sb.idx, need)
    return images[to_device(sb.idx, images.device)]


def prefetches(images) -> bool:
    """Whether an epoch decodes each step's images ahead, in a background thread: for an encoded set feeding
    an accelerator, which would otherwise idle while the CPU decodes. On a CPU the decoding would take
    cores from the model instead."""
    return isinstance(images, EncodedImages) and images.device.type != "cpu"


class StepImages:
    """Each step's images of an epoch (`step_images`); with `prefetches`, step s + 1's are decoded by a
    background thread while step s trains, otherwise each is gathered when its step asks."""

    def __init__(self, images, batches: list[StepBatch], rows: torch.Tensor):
        self.images, self.batches, self.rows = images, batches, rows
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="decode") if prefetches(images) else None
        self.pending: dict[int, Future] = {}

    def _submit(self, s: int) -> None:
        if self.pool is not None and s < len(self.batches):
            self.pending[s] = self.pool.submit(step_images, self.images, self.batches[s], self.rows)

    def get(self, s: int) -> torch.Tensor:
        if self.pool is None:
            return step_images(self.images, self.batches[s], self.rows)
        if s not in self.pending:
            self._submit(s)
        images = self.pending.pop(s).result()
        self._submit(s + 1)
        return images

    def __enter__(self) -> "StepImages":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=True)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA, where it pays. On CPU it does not, and torch 2.14.1 corrupts memory
    (SIGSEGV / double free) training 8-channel (width 0.125) convs in channels_last with 2 threads."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def train_step(student: nn.Module, teacher: nn.Module | None, opt: torch.optim.Optimizer, images: torch.Tensor,
               sb: StepBatch, rows: torch.Tensor, weight: float, cfg: PosttrainConfig, image_size: int, mean, std,
               scaler=None, labels: torch.Tensor | None = None,
               batch_images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimisation step on this worker's `rows` of the global batch `sb`.

    The teacher labels the very crop tensor the student is fed (after
    random-resized-crop, flip and CutMix/MixUp). With `labels` (the images'
    classes, on CPU) the student learns them instead, by cross entropy with
    mixed crops weighted by how much of each image they show (no teacher).
    `batch_images`: the step's images if already gathered (`step_images`).
    Returns (weighted loss, teacher logits or None).
    """
    device = images.device
    # The step's random draws (CPU) travel as queued copies: no host sync inside the loop.
    rows_on = to_device(rows, device)
    if batch_images is None:
        batch_images = step_images(images, sb, rows)
    crops = make_crops(batch_images, sb.plan.to(device), image_size, mean, std, rows_on)
    crops = crops.contiguous(memory_format=memory_format(device))
    with autocast(device, cfg.amp):
        if labels is not None:
            target = None
        elif sb.targets is None:
            target = soft_labels(teacher, crops, cfg.teacher_bn)
        else:
            target = to_device(sb.targets[rows], device)
        logits = student(crops)
    if labels is None:
        loss = kd_loss(logits, target, cfg.temperature) * weight
    else:
        partner = sb.plan.partner[rows] if sb.plan.partner is not None else rows
        loss = hard_label_loss(logits, to_device(labels[sb.idx[rows]], device),
                               to_device(labels[sb.idx[partner]], device), mix_weight(sb.plan, image_size)) * weight
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
    with StepImages(images, batches, rows) as feed:
        for s, sb in enumerate(batches):
            set_lr(opt, cosine_lr(cfg.lr, step, total_steps, period=cfg.cosine_period))
            loss, target = train_step(student, teacher, opt, images, sb, rows, weight, cfg, image_size, mean, std,
                                      scaler, labels, feed.get(s))
            running += loss
            if on_step is not None:
                on_step(s, sb, target)
            step += 1
    return running, step


def build_teacher(teacher, info: DatasetInfo, device, cfg: PosttrainConfig | None = None) -> nn.Module:
    """The frozen relabelling teacher, fed inputs normalised with the dataset's statistics: one checkpoint, or a
    committee of several (a tuple of checkpoints) whose soft labels combine as `cfg.committee` says."""
    device = torch.device(device)
    built = [frozen(adapt_inputs(c.build(), c, info).to(device, memory_format=memory_format(device)))
             for c in members(teacher)]
    if len(built) == 1:
        return built[0]
    cfg = cfg or PosttrainConfig()
    return frozen(Committee(built, cfg.committee, cfg.temperature))


class PostTrainer:
    """One post-train of one rank: the student, its optimiser, where it is, and the epoch loop.

    images: the distilled set (uint8, on its device, or an `EncodedImages` set bound to one); teacher: the frozen
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
        self.average = init_average(self.student) if cfg.ema > 0 else None  # `cfg.ema`: what is evaluated

    def state_dict(self) -> dict:
        """Plain tensors and numbers: everything to resume from."""
        return {**self.state, "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                **({"ema": {k: v.detach().cpu() for k, v in self.average.items()}} if self.average is not None else {})}

    def load_state_dict(self, saved: dict) -> None:
        saved = dict(saved)
        self.student.load_state_dict(saved.pop("student"))
        self.opt.load_state_dict(saved.pop("optimizer"))
        scaler = saved.pop("scaler", None)
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(scaler)
        average = saved.pop("ema", None)
        if self.average is not None:
            if average is None:
                raise ValueError("the checkpoint holds no moving average of the student (`posttrain.ema` was 0)")
            for k, v in average.items():
                self.average[k].copy_(v)
        self.state.update(saved)

    def evaluated(self) -> nn.Module:
        """The model top-1 is measured on: the student, or its moving average with `cfg.ema`."""
        return self.student if self.average is None else averaged_model(self.student, self.average)

    def _update_average(self) -> None:
        # state["step"] counts finished steps before this epoch; the optimiser step just taken is one more
        ema_update(self.average, self.student.state_dict(), ema_decay(self.cfg.ema, self._steps_done))
        self._steps_done += 1

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
            if self.average is not None:
                self._steps_done = self.state["step"]
                hook = self._with_average(hook)
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

    def _with_average(self, hook):
        def step(s, sb, target):
            self._update_average()
            if hook is not None:
                hook(s, sb, target)
        return step

    def lr(self) -> float:
        return cosine_lr(self.cfg.lr, self.state["step"], self.total_steps, period=self.cfg.cosine_period)
