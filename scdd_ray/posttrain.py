"""Post-train on Ray Train: a fresh student learns from the distilled images
with the teacher's soft labels on every augmented crop; top-1 is measured on
the REAL test split.

Shape (as in the Ray Train examples):
- `train_loop_per_worker(config)` is a plain function of a config dict that
  every Ray Train worker runs: it reads the distilled Parquet shards, builds
  the student (`prepare_model`: DDP, gloo on CPU, nccl on GPU) and the frozen
  teacher, trains, evaluates on rank 0 and reports metrics with a checkpoint.
- `run_posttrain(...)` is the driver: it checks the cluster can place the
  workers, builds the `TorchTrainer` and returns top-1 and the history.
- `run_epoch` / `train_step` are the maths of one epoch / one step, plain
  torch, shared by every worker count and tested in process.

One global batch of `batch_size` images per step whatever the worker count:
every worker draws the same image order and crop plan (seeded by run seed and
epoch), then builds, labels and learns from only its slice of the batch. With
N workers each step therefore sees the same crops as with one; DDP averages
the gradients (each worker's loss is weighted by its share of the batch, so
uneven splits such as 13 + 12 stay exact). What differs is BatchNorm: each
worker normalises with the statistics of its own slice.

Every random draw is a function of (seed, epoch), so a run resumed from the
checkpoint of epoch k continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .config import ConfigError, PosttrainConfig
from .data import DatasetInfo, ImageSet
from .evaluation import top1
from .models import autocast
from .relabel import (MIX_CODES, CropPlan, kd_loss, logits_from_topk, make_crops, plan_crops, soft_labels,
                      topk_probs)
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


def epoch_batches(n: int, cfg: PosttrainConfig, image_size: int, seed: int, epoch: int) -> list[StepBatch]:
    """The image order and crop plans of one epoch; a function of (seed, epoch) only."""
    batch = min(cfg.batch_size, n)
    g = torch.Generator().manual_seed(derive_seed(seed, "posttrain-epoch", epoch))
    order = torch.randperm(n, generator=g)
    out = []
    for s in range(steps_per_epoch(n, batch)):
        idx = order[s * batch:(s + 1) * batch]
        out.append(StepBatch(idx, plan_crops(len(idx), cfg, image_size, g)))
    return out


def stored_batches(root: str, epoch: int, num_classes: int, temperature: float) -> list[StepBatch]:
    """One epoch's batches rebuilt from stored soft labels (crop plans and teacher top-k)."""
    from .store import read_soft_labels

    rows = read_soft_labels(root, epoch)
    out = []
    for s in np.unique(rows["step"]):
        sel = np.flatnonzero(rows["step"] == s)
        r = {k: v[sel] for k, v in rows.items()}
        if not np.array_equal(r["slot"], np.arange(len(sel))):
            from .store import StoreError

            raise StoreError(f"{root}: epoch {epoch + 1} step {int(s)} lacks some crops")
        boxes = torch.from_numpy(np.stack([r["box_w"], r["box_h"], r["box_cx"], r["box_cy"]], 1).astype(np.float32))
        plan = CropPlan(boxes, torch.from_numpy(r["flip"].astype(bool)), MIX_NAMES[int(r["mix"][0])],
                        torch.from_numpy(r["partner"].astype(np.int64)),
                        tuple(int(r[c][0]) for c in ("cut_y0", "cut_y1", "cut_x0", "cut_x1")), float(r["lam"][0]))
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


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA, where it pays. On CPU it does not, and torch 2.14.1 corrupts memory
    (SIGSEGV / double free) training 8-channel (width 0.125) convs in channels_last with 2 threads."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def train_step(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
               sb: StepBatch, rows: torch.Tensor, weight: float, cfg: PosttrainConfig, image_size: int, mean, std,
               scaler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on this worker's `rows` of the global batch `sb`.

    The teacher labels the very crop tensor the student is fed (after
    random-resized-crop, flip and CutMix/MixUp). Returns (weighted loss, teacher logits).
    """
    device = images.device
    crops = make_crops(images[sb.idx.to(device)], sb.plan, image_size, mean, std, rows)
    crops = crops.contiguous(memory_format=memory_format(device))
    with autocast(device, cfg.amp):
        if sb.targets is None:
            target = soft_labels(teacher, crops)
        else:
            target = sb.targets[rows].to(device)
        logits = student(crops)
    loss = kd_loss(logits, target, cfg.temperature) * weight
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
              scaler=None, on_step=None) -> tuple[torch.Tensor, int]:
    """Train one epoch; returns (sum of this worker's weighted step losses, global step after it)."""
    running = torch.zeros((), device=images.device)
    for s, sb in enumerate(batches):
        set_lr(opt, cosine_lr(cfg.lr, step, total_steps))
        loss, target = train_step(student, teacher, opt, images, sb, rows, weight, cfg, image_size, mean, std,
                                  scaler)
        running += loss
        if on_step is not None:
            on_step(s, sb, target)
        step += 1
    return running, step


# --- the Ray Train worker ----------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: the whole post-train of one rank, resumable from its last checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    from .distill import adapt_inputs
    from .models import create_model, frozen
    from .store import images_digest, read_distilled, soft_label_file, write_soft_labels

    t_enter = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: PosttrainConfig = config["cfg"]
    info: DatasetInfo = config["info"]
    image_size, seed = config["image_size"], config["seed"]
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("threads"):
        torch.set_num_threads(config["threads"])

    images, _, _ = read_distilled(config["source"])  # every worker reads the Parquet shards itself
    if images_digest(images) != config["images_digest"]:
        raise RuntimeError(f"worker {rank} read other images from {config['source']} than the driver "
                           "(multi-node runs need the distilled directory on shared storage)")
    images = images.to(device)
    n = len(images)
    batch = min(cfg.batch_size, n)
    per_epoch = steps_per_epoch(n, batch)
    total_steps = cfg.epochs * per_epoch
    rows, weight = rank_rows(batch, rank, world)

    teacher = None  # with stored soft labels the teacher is not run at all
    if not config.get("soft_labels"):
        ckpt = ray.get(config["teacher"])
        teacher = frozen(adapt_inputs(ckpt.build(), ckpt, info).to(device, memory_format=memory_format(device)))
    torch.manual_seed(seed)  # student initialisation, identical on every rank
    student = create_model(cfg.student, info.num_classes, cfg.student_width, config["small_input"])
    student = student.to(device, memory_format=memory_format(device))
    opt = make_optimizer(student, cfg)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None
    state = {"epoch": 0, "step": 0, "history": [], "trained_epochs": [], "attempts": 0}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        student.load_state_dict(saved.pop("student"))
        opt.load_state_dict(saved.pop("optimizer"))
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state.update(saved)
    resumed_from = state["epoch"]
    state["attempts"] += 1
    student = ray.train.torch.prepare_model(student)  # DDP when world > 1 (gloo on CPU, nccl on GPU)
    student.train()
    test = ray.get(config["test"]) if rank == 0 else None
    stored, store_to = config.get("soft_labels"), config.get("store_soft_labels")
    k = min(config.get("topk", 10), info.num_classes)
    startup = t_enter - config["t0"]
    every = checkpoint_every(cfg)
    fail_after = config.get("_fail_after_epoch")  # test hook: simulate a crash after this epoch's report

    for epoch in range(state["epoch"], cfg.epochs):
        if stored:
            batches = stored_batches(stored, epoch, info.num_classes, cfg.temperature)
        else:
            batches = epoch_batches(n, cfg, image_size, seed, epoch)
        recorded: list[dict] = []
        on_step = None
        if store_to:
            def on_step(s, sb, target, _e=epoch):
                recorded.append(soft_label_rows(_e, s, sb, rows, target, cfg.temperature, k))
        running, step = run_epoch(student, teacher, opt, images, batches, rows, weight, cfg, image_size, info.mean,
                                  info.std, step=state["step"], total_steps=total_steps, scaler=scaler,
                                  on_step=on_step)
        if store_to:
            cols = {c: np.concatenate([r[c] for r in recorded]) for c in recorded[0]}
            write_soft_labels(store_to, epoch, rank, cols, k)
            if rank == 0:  # files of writers beyond this world size (an earlier run) are stale
                for r in range(world, 1024):
                    p = soft_label_file(store_to, epoch, r)
                    if os.path.exists(p):
                        os.remove(p)
        state["epoch"], state["step"] = epoch + 1, step
        state["trained_epochs"].append(epoch + 1)
        e1 = epoch + 1
        evaluate = e1 == cfg.epochs or (cfg.eval_every and e1 % cfg.eval_every == 0)
        if not (evaluate or e1 % every == 0):
            continue
        if world > 1:
            torch.distributed.all_reduce(running)
        rec = {"epoch": e1, "loss": float(running) / len(batches) / world, "lr": cosine_lr(cfg.lr, step, total_steps)}
        if evaluate and rank == 0:
            rec["top1"] = top1(_unwrap(student), test, info.mean, info.std, device)
        state["history"].append(rec)
        metrics = {**rec, "startup_seconds": startup, "resumed_from": resumed_from}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({**state, "student": {k_: v.detach().cpu() for k_, v in _unwrap(student).state_dict().items()},
                            "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                            "startup_seconds": startup, "resumed_from": resumed_from, "world_size": world},
                           os.path.join(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{e1:05d}")
        if rank == 0:
            log.info("posttrain epoch %d/%d loss %.4f%s", e1, cfg.epochs, rec["loss"],
                     f" top-1 {rec['top1']:.2f}%" if "top1" in rec else "")
        if fail_after is not None and e1 == fail_after:
            raise RuntimeError(f"injected failure after epoch {e1}")


# --- the driver --------------------------------------------------------------------

@dataclass
class PosttrainJob:
    """Everything a post-train needs, checked by the caller."""

    source: str  # a distilled directory: manifest + shards, bare *.parquet, or reference ImageFolder
    images_digest: str
    num_images: int
    teacher: object  # models.Checkpoint
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
        teacher = hashlib.sha256()
        for k_, v in sorted(self.teacher.state_dict.items()):
            teacher.update(k_.encode())
            teacher.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        keep = {"cfg": cfg, "images": self.images_digest, "teacher": teacher.hexdigest()[:16],
                "test": [self.info.name, self.image_size], "seed": self.seed, "soft_labels": bool(self.soft_labels)}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def placement(num_workers: int, use_gpu: bool, threads: int = 1, flag: str = "--num-workers",
              resources: dict | None = None) -> dict:
    """Check the cluster can place `num_workers` workers; returns the resources of one worker.

    Ray Train would otherwise wait for resources forever. `resources` are the
    cluster totals (default: the running Ray cluster's). A CPU worker reserves
    `threads` CPUs and runs that many torch threads: on CPU, scale with workers
    (DDP) first; two torch threads on a busy 2-core machine ran one epoch 60x
    slower than one thread here (OpenMP threads waiting on each other).
    """
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if use_gpu:
        if num_workers > gpus:
            raise ConfigError(flag, f"{num_workers} GPU workers need {num_workers} GPUs but the Ray cluster has {gpus}")
        return {"CPU": 1, "GPU": 1}
    if num_workers * threads > cpus:
        raise ConfigError(flag, f"{num_workers} workers need {num_workers * threads} CPUs but the Ray cluster has "
                                f"{cpus}")
    return {"CPU": threads}


def soft_label_meta(job: PosttrainJob, complete: bool) -> dict:
    """What `--soft-labels` checks before training from stored labels."""
    from .store import SOFT_FORMAT

    batch = min(job.cfg.batch_size, job.num_images)
    return {"format": SOFT_FORMAT, "complete": complete, "images_digest": job.images_digest,
            "num_images": job.num_images, "num_classes": job.info.num_classes, "temperature": job.cfg.temperature,
            "topk": min(job.topk, job.info.num_classes), "epochs": job.cfg.epochs, "batch_size": batch,
            "steps_per_epoch": steps_per_epoch(job.num_images, batch), "seed": job.seed,
            "crop_scale": list(job.cfg.crop_scale), "flip": job.cfg.flip, "mix": job.cfg.mix,
            "mix_prob": job.cfg.mix_prob, "image_size": job.image_size}


def check_soft_labels(root: str, cfg: PosttrainConfig, digest: str, num_classes: int, num_images: int) -> None:
    """Stored soft labels must be complete and made for these images, classes, temperature and batch."""
    from .store import SOFT_FORMAT, SOFT_META

    path = os.path.join(root, SOFT_META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise ConfigError("--soft-labels", f"{root} holds no stored soft labels ({SOFT_META} missing or unreadable)") from None
    if meta.get("format") != SOFT_FORMAT or not meta.get("complete"):
        raise ConfigError("--soft-labels", f"{root} is incomplete (its post-train did not finish)")
    if meta.get("images_digest") != digest:
        raise ConfigError("--soft-labels", f"{root} labels other images than --distilled holds")
    for key, want, flag in (("num_classes", num_classes, "--teacher"), ("temperature", cfg.temperature, "--temperature"),
                            ("batch_size", min(cfg.batch_size, num_images), "--batch-size")):
        if meta.get(key) != want:
            raise ConfigError(flag, f"{root} was stored with {key} {meta.get(key)}, this run uses {want}")
    if cfg.epochs > meta.get("epochs", 0):
        raise ConfigError("--epochs", f"{root} holds {meta.get('epochs', 0)} epochs of soft labels, {cfg.epochs} asked for")


def check_workers(job: PosttrainJob, num_workers: int, use_gpu: bool, threads: int = 1, flag: str = "--num-workers",
                  resources: dict | None = None) -> dict:
    """Every worker needs a slice of the global batch and a place in the cluster; returns per-worker resources."""
    batch = min(job.cfg.batch_size, job.num_images)
    if batch < num_workers:
        raise ConfigError(flag, f"{num_workers} workers cannot share a batch of {batch} images")
    return placement(num_workers, use_gpu, threads, flag, resources)


def run_posttrain(job: PosttrainJob, *, storage_path: str, name: str, num_workers: int = 1, use_gpu: bool = False,
                  threads: int = 1, max_failures: int = 0, fault_after_epoch: int | None = None,
                  flag: str = "--num-workers") -> PosttrainResult:
    """Post-train `job` on `num_workers` Ray Train workers; resumes from `storage_path/name` if it holds a run.

    Ray must be initialised (engine.connect). Raises ConfigError before
    starting anything if the cluster cannot place the workers.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .engine import EngineError

    per_worker = check_workers(job, num_workers, use_gpu, threads, flag)
    done = finished_state(storage_path, name, job.cfg.epochs)
    if done is not None:  # a finished run: nothing to train, nothing to start
        return _result(done, 0.0, None, num_workers)
    t0 = time.time()
    config = {
        "cfg": job.cfg, "info": job.info, "image_size": job.image_size, "small_input": job.small_input,
        "seed": job.seed, "source": os.path.abspath(job.source), "images_digest": job.images_digest,
        "teacher": ray.put(job.teacher), "test": ray.put(job.test), "threads": per_worker["CPU"],
        "soft_labels": job.soft_labels and os.path.abspath(job.soft_labels),
        "store_soft_labels": job.store_soft_labels and os.path.abspath(job.store_soft_labels),
        "topk": job.topk, "t0": t0, "_fail_after_epoch": fault_after_epoch,
    }
    if job.store_soft_labels:
        os.makedirs(job.store_soft_labels, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=os.path.abspath(storage_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and friends: one line naming the cause
        failures = getattr(e, "worker_failures", None) or {}
        cause = next(iter(failures.values()), e)
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        raise EngineError(f"post-train failed: {lines[-1] if lines else type(cause).__name__}; "
                          "checkpoints are kept, rerun to resume") from None
    seconds = time.time() - t0
    if result.checkpoint is None:
        raise EngineError(f"post-train under {storage_path}/{name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    if state["epoch"] != job.cfg.epochs:
        raise EngineError(f"post-train stopped at epoch {state['epoch']} of {job.cfg.epochs}")
    res = _result(state, seconds, (result.metrics or {}).get("startup_seconds"), num_workers)
    log.info("posttrain: %d epochs on %d workers, top-1 on the real test split %.2f%% (%.0fs)", job.cfg.epochs,
             num_workers, res.top1, seconds)
    return res


def finished_state(storage_path: str, name: str, epochs: int) -> dict | None:
    """The final checkpoint's state if the run `storage_path/name` already finished, else None."""
    path = os.path.join(storage_path, name, f"epoch-{epochs:05d}", STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a checkpoint cut short: let Ray Train resume from the previous one
        return None
    return state if state.get("epoch") == epochs else None


def _result(state: dict, seconds: float, startup: float | None, num_workers: int) -> PosttrainResult:
    return PosttrainResult(top1=state["history"][-1]["top1"], seconds=seconds, student_state=state["student"],
                           history=state["history"], epochs=state["epoch"], steps=state["step"],
                           trained_epochs=state["trained_epochs"], startup_seconds=startup,
                           resumed_from=int(state.get("resumed_from", 0)), num_workers=num_workers)
