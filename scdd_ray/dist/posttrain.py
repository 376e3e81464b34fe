"""Post-training on Ray Train: the core training loop on N workers (DDP).

As in the Ray Train examples: `train_loop_per_worker(config)` is a plain
function of a config dict that every worker runs (it reads the distilled
Parquet shards, builds the frozen teacher and a `core.posttrain.PostTrainer`,
wraps the student with `prepare_model` (DDP: gloo on CPU, nccl on GPU),
trains, evaluates on rank 0 and reports metrics with a checkpoint);
`run_posttrain(...)` is the driver.

Every worker draws the same image order and crop plan and trains on its
slice of the one global batch (core.posttrain explains why that is exact), so
a run resumed from the checkpoint of epoch k continues exactly as the
uninterrupted run would.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.nn as nn
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ..core.evaluation import top1
from ..core.posttrain import PostTrainer, PosttrainResult, build_teacher, checkpoint_every
from ..core.posttrain_job import PosttrainJob
from ..core.soft_labels import SoftLabelRecorder
from ..errors import CheckpointError, ConfigError, Diverged, EngineError
from ..models.checkpoint import load_state_file
from ..store.distilled import read_encoded
from ..store.encoded import EncodedImages, images_digest
from ..store.soft_labels import soft_label_file, write_soft_labels
from .cluster import placement, worker_error

log = logging.getLogger("scdd_ray")
STATE_FILE = "state.pt"
# Ray Train waits 60 s for the cluster to place its workers, then retries, by default forever (a silent
# hang when other jobs hold the resources); after this many retries the post-train stops with an error.
START_RETRIES = 4
DECODED_MAX_BYTES = 1 << 30  # larger distilled sets stay encoded on each worker


def read_images(source: str, digest: str, rank: int, device, keep_encoded: bool | None = None
                ) -> tuple[torch.Tensor | EncodedImages, torch.Tensor]:
    """The distilled set of this worker and its class ids: decoded on its device, or (`keep_encoded`, by default
    when it is larger than DECODED_MAX_BYTES decoded) kept encoded and decoded batch by batch (ImageNet-1K at
    IPC 50 would be 7.5 GB per worker). It must be the set the driver saw (`digest`)."""
    encoded = read_encoded(source)  # every worker reads the Parquet shards itself
    if keep_encoded is None:
        keep_encoded = len(encoded) * encoded.decode([0]).numel() > DECODED_MAX_BYTES
    images = None if keep_encoded else encoded.decode_all()[0]
    if (encoded.digest() if keep_encoded else images_digest(images)) != digest:
        raise RuntimeError(f"worker {rank} read other images from {source} than the driver "
                           "(multi-node runs need the distilled directory on shared storage)")
    return (encoded.to(device) if keep_encoded else images.to(device)), torch.from_numpy(encoded.class_ids)


def _soft_label_writer(store_to: str, trainer: PostTrainer, rank: int, world: int, k: int):
    """(on_step, on_epoch_end): record the teacher's top-k on every crop, write one file per epoch and rank."""
    recorder = SoftLabelRecorder(trainer.cfg.temperature, k)

    def on_step(epoch, s, sb, target):
        recorder.record(epoch, s, sb, trainer.rows, target)

    def on_epoch_end(epoch):
        write_soft_labels(store_to, epoch, rank, recorder.columns(), k)
        if rank == 0:  # files of writers beyond this world size (an earlier run) are stale
            for r in range(world, 1024):
                p = soft_label_file(store_to, epoch, r)
                if os.path.exists(p):
                    os.remove(p)
    return on_step, on_epoch_end


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: the whole post-train of one rank, resumable from its last checkpoint."""
    t_enter = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, info = config["cfg"], config["info"]
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("threads"):
        torch.set_num_threads(config["threads"])
    images, class_ids = read_images(config["source"], config["images_digest"], rank, device)
    stored, store_to = config.get("soft_labels"), config.get("store_soft_labels")
    needs_teacher = not stored and cfg.labels == "soft"
    teacher = build_teacher(ray.get(config["teacher"]), info, device, cfg) if needs_teacher else None
    trainer = PostTrainer(cfg, images, teacher, info, image_size=config["image_size"],
                          small_input=config["small_input"], seed=config["seed"], rank=rank, world=world,
                          stored=stored, labels=class_ids)
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        trainer.load_state_dict(checkpoint_state(resumed))
    resumed_from = trainer.state["epoch"]
    trainer.state["attempts"] += 1
    before = _elapsed_before(trainer.state, config["t0"])
    trainer.model = ray.train.torch.prepare_model(trainer.student)  # DDP when world > 1
    test = ray.get(config["test"]) if rank == 0 else None
    startup = t_enter - config["t0"]
    every = checkpoint_every(cfg)
    on_step, write_epoch = (_soft_label_writer(store_to, trainer, rank, world, min(config["topk"],
                                                                                 info.num_classes))
                            if store_to else (None, None))

    def on_epoch(e1: int, running: torch.Tensor, steps: int) -> None:
        if write_epoch is not None:
            write_epoch(e1 - 1)
        evaluate = e1 == cfg.epochs or (cfg.eval_every and e1 % cfg.eval_every == 0)
        if not (evaluate or e1 % every == 0):
            return
        if world > 1:
            torch.distributed.all_reduce(running)
        rec = {"epoch": e1, "loss": float(running) / steps / world, "lr": trainer.lr()}
        if evaluate and rank == 0:
            rec["top1"] = top1(trainer.evaluated(), test, info.mean, info.std, device)
        trainer.state["history"].append(rec)
        elapsed = {"elapsed_seconds": before + time.time() - config["t0"], "elapsed_before": before,
                   "call_t0": config["t0"]}
        metrics = {**rec, "startup_seconds": startup, "resumed_from": resumed_from}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({**trainer.state_dict(), "startup_seconds": startup, "resumed_from": resumed_from,
                            "world_size": world, **elapsed}, os.path.join(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{e1:05d}")
        if rank == 0:
            rate = (e1 - resumed_from) / max(time.time() - t_enter, 1e-9)
            log.info("posttrain epoch %d/%d loss %.4f%s (eta %.0fs)", e1, cfg.epochs, rec["loss"],
                     f" top-1 {rec['top1']:.2f}%" if "top1" in rec else "", (cfg.epochs - e1) / rate)

    trainer.fit(on_epoch=on_epoch, on_step=on_step)


def _elapsed_before(state: dict, call_t0: float) -> float:
    """Seconds the run took before this driver call, from the state it resumes (0 when fresh): a run killed
    and rerun counts every process's time, not the last one's. A worker Ray Train restarted within this
    same call resumes a checkpoint of this call, whose time `call_t0` already counts."""
    if state.get("call_t0") == call_t0:
        return float(state.get("elapsed_before", 0.0))
    return float(state.get("elapsed_seconds", 0.0))


def check_workers(job: PosttrainJob, num_workers: int, use_gpu: bool, threads: int = 1, field: str = "num_workers",
                  resources: dict | None = None) -> dict:
    """Every worker needs a slice of the global batch and a place in the cluster; returns per-worker resources."""
    if job.batch(num_workers) < num_workers:
        raise ConfigError(field, f"{num_workers} workers cannot share a batch of {job.batch(num_workers)} images")
    return placement(num_workers, use_gpu, threads, field, resources)


def run_posttrain(job: PosttrainJob, *, storage_path: str, name: str, num_workers: int = 1, use_gpu: bool = False,
                  threads: int = 1, max_failures: int = 0) -> PosttrainResult:
    """Post-train `job` on `num_workers` Ray Train workers running `train_loop_per_worker`; resumes from
    `storage_path/name` if it holds a run.

    Ray must be initialised (cluster.connect). Raises ConfigError before
    starting anything if the cluster cannot place the workers.
    """
    per_worker = check_workers(job, num_workers, use_gpu, threads)
    if job.cfg.batch_per_worker:  # the worker count sets the global batch: a run of its own
        name = f"{name}-w{num_workers}"
    clean_run_dir(os.path.join(storage_path, name))
    done = finished_state(storage_path, name, job.cfg.epochs)
    if done is not None:  # a finished run: nothing to train, nothing to start; its time is what it took then
        return _result(done, done.get("elapsed_seconds"), None, num_workers)
    t0 = time.time()
    config = {
        "cfg": job.cfg, "info": job.info, "image_size": job.image_size, "small_input": job.small_input,
        "seed": job.seed, "source": os.path.abspath(job.source), "images_digest": job.images_digest,
        "teacher": ray.put(job.teacher), "test": ray.put(job.test), "threads": per_worker["CPU"],
        "soft_labels": job.soft_labels and os.path.abspath(job.soft_labels),
        "store_soft_labels": job.store_soft_labels and os.path.abspath(job.store_soft_labels),
        "topk": job.topk, "t0": t0,
    }
    if job.store_soft_labels:
        os.makedirs(job.store_soft_labels, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=os.path.abspath(storage_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures,
                                                          controller_failure_limit=START_RETRIES)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and friends: one line naming the cause
        failures = getattr(e, "worker_failures", None) or {}
        cause = next(iter(failures.values()), e)
        reason = worker_error(cause)
        if isinstance(cause, Diverged) or isinstance(getattr(cause, "cause", None), Diverged):
            # a rerun would diverge again: no "rerun to resume"
            raise Diverged(reason.split(f"{Diverged.__name__}: ", 1)[-1]) from None
        raise EngineError(f"post-train failed: {reason}; checkpoints are kept, rerun to resume") from None
    if result.checkpoint is None:
        raise EngineError(f"post-train under {storage_path}/{name} finished without a checkpoint")
    state = checkpoint_state(result.checkpoint)
    # from the call to the last checkpoint, and the earlier processes' time when it resumed one of theirs
    # (every checkpoint this loop writes carries it: the last one is always this call's)
    seconds = state["elapsed_seconds"]
    if state["epoch"] != job.cfg.epochs:
        raise EngineError(f"post-train stopped at epoch {state['epoch']} of {job.cfg.epochs}")
    res = _result(state, seconds, (result.metrics or {}).get("startup_seconds"), num_workers)
    log.info("posttrain: %d epochs on %d workers, top-1 on real held-out images %.2f%% (%.0fs)", job.cfg.epochs,
             num_workers, res.top1, seconds)
    return res


def finished_state(storage_path: str, name: str, epochs: int) -> dict | None:
    """The final checkpoint's state if the run `storage_path/name` already finished, else None."""
    path = os.path.join(storage_path, name, f"epoch-{epochs:05d}", STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        state = load_state_file(path)
    except CheckpointError as e:  # cut short, or not ours: never unpickled; Ray Train resumes from its last
        log.warning("posttrain: %s", e.message)
        return None
    return state if state.get("epoch") == epochs else None


def clean_run_dir(run_dir: str) -> None:
    """Leave `run_dir` as a run Ray Train can resume, or remove it so that the post-train starts over.

    A full disk or a kill while Ray Train writes leaves a checkpoint it never
    registered (removed here) or a record of its checkpoints it cannot read
    (then it cannot resume: the run is removed). A registered state file that
    is damaged or was planted is never loaded: the run is removed too, with a
    warning, as a damaged shard is dropped and computed again. What Ray Train
    registered is read through its public `Result.from_path`.
    """
    if not os.path.isdir(run_dir):
        return
    epochs = sorted(d for d in os.listdir(run_dir) if d.startswith("epoch-"))
    if not epochs:
        return
    try:  # an absolute path: Result.from_path reads it as a file-system URI, and a relative one is refused
        result = ray.train.Result.from_path(os.path.abspath(run_dir))
        registered = {os.path.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints or []}
    except Exception as e:  # no record of its checkpoints, or an unreadable one: nothing to resume from
        return _start_over(run_dir, f"Ray Train cannot resume it ({type(e).__name__})")
    for d in epochs:
        if d not in registered:
            log.warning("posttrain: removing %s, a checkpoint Ray Train did not finish writing",
                        os.path.join(run_dir, d))
            shutil.rmtree(os.path.join(run_dir, d))
            continue
        try:
            load_state_file(os.path.join(run_dir, d, STATE_FILE))
        except CheckpointError as e:
            return _start_over(run_dir, e.message)


def _start_over(run_dir: str, why: str) -> None:
    log.warning("posttrain: %s; training this student from the start (removing %s)", why, run_dir)
    shutil.rmtree(run_dir)


def checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    """The state in a checkpoint this loop reported, read without running any pickled code."""
    with checkpoint.as_directory() as d:
        return load_state_file(os.path.join(d, STATE_FILE))


def _result(state: dict, seconds: float, startup: float | None, num_workers: int) -> PosttrainResult:
    evaluated = state["ema"] if state.get("ema") is not None else state["student"]  # what top-1 measured
    return PosttrainResult(top1=state["history"][-1]["top1"], seconds=seconds, student_state=evaluated,
                           history=state["history"], epochs=state["epoch"], steps=state["step"],
                           trained_epochs=state["trained_epochs"], startup_seconds=startup,
                           resumed_from=int(state.get("resumed_from", 0)), num_workers=num_workers)
