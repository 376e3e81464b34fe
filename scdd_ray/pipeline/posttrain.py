"""The `posttrain` command: a student learns from any distilled set (ours, bare
Parquet files or a reference-layout image folder) with a teacher's soft labels,
on Ray Train, and is measured on the real test split."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import torch

from .. import data
from ..config import build_posttrain_config
from ..core.training import PosttrainJob, check_soft_labels, soft_label_meta
from ..dist.cluster import connect
from ..dist.train import check_workers, run_posttrain
from ..errors import ConfigError, DataError, StoreError
from ..models import create_model, save_checkpoint, small_input
from ..report import save_grid
from ..store import (SOFT_META, ShardStore, atomic_write_json, images_digest, plan_problem, read_distilled,
                     sweep_temp_files)
from ..backbones import load_checkpoint_arg
from .distill import RUN_FILE
from .outdir import check_not_busy, check_out_dir, lock_out_dir

POSTTRAIN_RUN_FILE = "posttrain-run.json"
log = logging.getLogger("scdd_ray")


@dataclass
class PosttrainRequest:
    """What the user asked for (`overrides`: PosttrainConfig fields, None for the preset's)."""

    distilled: str
    teacher: str
    out: str
    dataset: str | None = None
    data_dir: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    num_workers: int = 1
    num_gpus: int = 0
    threads_per_worker: int = 1
    address: str | None = None
    store_soft_labels: bool = False
    topk: int = 10
    soft_labels: str | None = None
    partial: bool = False  # train on a distilled set its run has not finished, on purpose


def _read_source(req: PosttrainRequest):
    """(images, class ids, shard directory, dataset, data_dir, image size or None, data options, ipc indices)
    of `req.distilled`."""
    src, dataset, data_dir, image_size, options = req.distilled, req.dataset, req.data_dir, None, {}
    run_file = os.path.join(src, RUN_FILE)
    if os.path.isfile(run_file):  # a distill output directory: its settings name the dataset
        try:
            with open(run_file) as f:
                prev = json.load(f)["config"]
            dataset, data_dir = dataset or prev["dataset"], data_dir or prev["data_dir"]
            image_size = prev["image_size"]
            options = {k: prev[k] for k in ("image_column", "label_column") if prev.get(k)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError("distilled", f"{run_file} is unreadable ({type(e).__name__})") from None
        src = os.path.join(src, "distilled")
    try:
        images, class_ids, ipc_indices = read_distilled(src)
    except StoreError as e:
        raise ConfigError("distilled", e.message) from None
    return images, class_ids, src, dataset, data_dir, image_size, options, ipc_indices


def _check_plan(req: PosttrainRequest, src: str, class_ids, ipc_indices, num_classes: int) -> None:
    """A set with a manifest holds its run's plan: every (class, IPC index) once (duplicates are refused
    when it is read), no row outside it. Incomplete (an interrupted run) only with `partial`; rows of
    another run never. Bare Parquet files and image folders carry no plan: they are trained on as they are."""
    store = ShardStore(src)
    if not store.exists():
        return
    try:
        meta = store.manifest().get("meta") or {}
    except StoreError as e:
        raise ConfigError("distilled", e.message) from None
    per_class, exact = meta.get("per_class"), True
    if not (isinstance(per_class, list) and all(isinstance(n, int) and n >= 0 for n in per_class)):
        if not (isinstance(meta.get("ipc"), int) and meta["ipc"] >= 1):
            return
        # a manifest written before the plan was recorded: `random` may hold fewer where a class is small
        per_class, exact = [meta["ipc"]] * num_classes, meta.get("method") != "random"
    outside, missing = plan_problem(class_ids, ipc_indices, per_class)
    if outside:
        raise ConfigError("distilled", f"{src} holds {outside}: images of another run were mixed in")
    if missing and exact and not req.partial:
        raise ConfigError("distilled", f"{src} is incomplete, {missing}; rerun its distill command to finish it "
                                       "(to post-train on it as it is, on purpose, copy its shard-*.parquet files "
                                       "to a directory of their own and name that)")
    if missing and exact:
        log.warning("distilled: %s is incomplete, %s; post-training on it as it is", src, missing)


def _check_request(req: PosttrainRequest) -> None:
    if not (isinstance(req.num_workers, int) and req.num_workers >= 1):
        raise ConfigError("num_workers", f"must be a positive integer (got {req.num_workers!r})")
    if req.num_gpus < 0 or req.num_gpus > 0 and not req.address and req.num_gpus > torch.cuda.device_count():
        raise ConfigError("num_gpus", f"asked for {req.num_gpus} GPUs but {torch.cuda.device_count()} are visible")
    if req.topk < 1:
        raise ConfigError("topk", f"must be a positive integer (got {req.topk})")
    if req.soft_labels and req.store_soft_labels:
        raise ConfigError("soft_labels", "cannot be combined with `store_soft_labels`")
    if req.threads_per_worker < 1:
        raise ConfigError("threads_per_worker", f"must be a positive integer (got {req.threads_per_worker})")


def prepare_posttrain(req: PosttrainRequest) -> tuple[PosttrainJob, torch.Tensor, torch.Tensor, str]:
    """Every check, before anything is written; returns (job, images, class ids, dataset)."""
    _check_request(req)
    images, class_ids, src, dataset, data_dir, image_size, options, ipc_indices = _read_source(req)
    teacher = load_checkpoint_arg(req.teacher, "teacher")
    dataset = dataset or teacher.meta.get("dataset")
    if dataset not in data.names():
        raise ConfigError("dataset", f"cannot tell the dataset of {req.distilled}; name it")
    image_size = image_size or int(images.shape[-1])
    try:
        test = data.load_split(dataset, "test", data_dir, image_size, **options)
    except DataError as e:
        raise ConfigError("data_dir", e.message) from None
    info = test.info
    if teacher.num_classes != info.num_classes:
        raise ConfigError("teacher", f"{req.teacher} has {teacher.num_classes} classes but the distilled "
                                     f"data ({dataset}) has {info.num_classes}")
    if int(class_ids.max()) >= info.num_classes:
        raise ConfigError("distilled", f"class id {int(class_ids.max())} is out of range for {dataset}")
    _check_plan(req, src, class_ids, ipc_indices, info.num_classes)
    cfg = build_posttrain_config(dataset, req.overrides, gpu=req.num_gpus > 0)
    if cfg.labels == "hard" and (req.soft_labels or req.store_soft_labels):
        raise ConfigError("posttrain.labels", "hard labels use no teacher: no soft labels to read or store")
    digest = images_digest(images)
    if req.soft_labels:
        check_soft_labels(req.soft_labels, cfg, digest, info.num_classes, len(images), req.num_workers)
    job = PosttrainJob(source=src, images_digest=digest, num_images=len(images), teacher=teacher, test=test,
                       info=info, cfg=cfg, image_size=image_size, small_input=small_input(image_size), seed=req.seed,
                       soft_labels=req.soft_labels, topk=req.topk,
                       store_soft_labels=os.path.join(req.out, "soft_labels") if req.store_soft_labels else None)
    check_out_dir(req.out, POSTTRAIN_RUN_FILE, job.fingerprint(), "posttrain run")
    check_not_busy(req.out)
    try:
        connect(req.address)
    except ConnectionError as e:
        raise ConfigError("address", str(e)) from None
    check_workers(job, req.num_workers, req.num_gpus > 0, req.threads_per_worker)
    return job, images, class_ids, dataset


def run(req: PosttrainRequest, job: PosttrainJob, images: torch.Tensor, class_ids, dataset: str) -> dict:
    """Train (or resume) the student under OUT/train/, then write student.pt, grid.png and posttrain.json;
    OUT is this process's alone meanwhile (a second run on it is refused before it writes anything)."""
    with lock_out_dir(req.out):
        return _run(req, job, images, class_ids, dataset)


def _run(req: PosttrainRequest, job: PosttrainJob, images: torch.Tensor, class_ids, dataset: str) -> dict:
    cfg, info, out = job.cfg, job.info, req.out
    fp = job.fingerprint()
    for path in sweep_temp_files(out):  # OUT is ours alone (the lock): a temp file here is a killed write's
        log.warning("removed %s, left by a write that was killed", path)
    atomic_write_json(os.path.join(out, POSTTRAIN_RUN_FILE), {"fingerprint": fp, "config": dataclasses.asdict(cfg),
                                                              "distilled": req.distilled, "teacher": req.teacher,
                                                              "seed": req.seed})
    if job.store_soft_labels:
        atomic_write_json(os.path.join(job.store_soft_labels, SOFT_META), soft_label_meta(job, complete=False, world=req.num_workers))
    res = run_posttrain(job, storage_path=os.path.join(out, "train"), name=f"student-{fp}",
                        num_workers=req.num_workers, use_gpu=req.num_gpus > 0, threads=req.threads_per_worker)
    if job.store_soft_labels:
        atomic_write_json(os.path.join(job.store_soft_labels, SOFT_META), soft_label_meta(job, complete=True, world=req.num_workers))
    student = create_model(cfg.student, info.num_classes, cfg.student_width, job.small_input)
    student.load_state_dict(res.student_state)
    save_checkpoint(os.path.join(out, "student.pt"), student, arch=cfg.student, width=cfg.student_width,
                    num_classes=info.num_classes, image_size=job.image_size, small_input=job.small_input,
                    mean=info.mean, std=info.std, method="student", meta={"dataset": dataset})
    save_grid(os.path.join(out, "grid.png"), images, class_ids, info.class_names)
    result = {"distilled": req.distilled, "teacher": req.teacher, "dataset": dataset, "num_images": int(len(images)),
              "top1": round(res.top1, 3), "posttrain_seconds": round(res.seconds, 2),
              "startup_seconds": None if res.startup_seconds is None else round(res.startup_seconds, 2),
              "num_workers": req.num_workers, "epochs": res.epochs, "steps": res.steps,
              "trained_epochs": res.trained_epochs, "seed": req.seed, "soft_labels": req.soft_labels,
              "stored_soft_labels": job.store_soft_labels, "history": res.history,
              "config": dataclasses.asdict(cfg)}
    atomic_write_json(os.path.join(out, "posttrain.json"), result)
    return result
