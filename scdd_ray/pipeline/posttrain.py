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
from ..backbones import load_checkpoint_arg
from ..config import RUN_FILE, build_config, flatten
from ..core.posttrain_job import PosttrainJob, check_soft_labels, soft_label_meta
from ..dist.cluster import connect
from ..dist.posttrain import check_workers, run_posttrain
from ..errors import ConfigError, DataError, StoreError
from ..models.checkpoint import save_checkpoint
from ..models.factory import create_model
from ..plots import save_grid
from ..schema import DistillConfig, PosttrainOptions, teacher_paths
from ..store.atomic import atomic_write_json
from ..store.atomic import sweep_temp_files
from ..store.distilled import plan_problem, read_distilled
from ..store.encoded import images_digest
from ..store.shards import ShardStore
from ..store.soft_labels import SOFT_META
from .outdir import check_not_busy, check_out_dir, lock_out_dir

POSTTRAIN_RUN_FILE = "posttrain-run.json"
log = logging.getLogger("scdd_ray")


@dataclass
class PosttrainRequest:
    """What the user asked for: the command's options, the recipe fields set by flags, a config file."""

    opts: PosttrainOptions
    given: dict = dataclasses.field(default_factory=dict)
    file: dict | None = None


# What a distill run's run.json says of its data, which a post-train of its images keeps.
RUN_DATA = ("dataset", "data_dir", "image_size", "image_column", "label_column", "holdout", "train_noval")


def _read_source(distilled: str):
    """(images, class ids, shard directory, the data settings of the distill run or {}) of `distilled`."""
    src, run = distilled, {}
    run_file = os.path.join(src, RUN_FILE)
    if os.path.isfile(run_file):  # a distill output directory: its settings name the dataset
        try:
            with open(run_file) as f:
                prev = json.load(f)["config"]
            run = {k: prev[k] for k in RUN_DATA if prev.get(k) is not None}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError("distilled", f"{run_file} is unreadable ({type(e).__name__})") from None
        src = os.path.join(src, "distilled")
    try:
        images, class_ids, ipc_indices = read_distilled(src)
    except StoreError as e:
        raise ConfigError("distilled", e.message) from None
    return images, class_ids, src, run, ipc_indices


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
    if missing and exact and not req.opts.partial:
        raise ConfigError("distilled", f"{src} is incomplete, {missing}; rerun its distill command to finish it "
                                       "(or post-train on it as it is, on purpose: `partial`)")
    if missing and exact:
        log.warning("distilled: %s is incomplete, %s; post-training on it as it is", src, missing)


def _check_request(req: PosttrainRequest) -> None:
    o = req.opts
    if o.topk < 1:
        raise ConfigError("topk", f"must be a positive integer (got {o.topk})")
    if o.soft_labels and o.store_soft_labels:
        raise ConfigError("soft_labels", "cannot be combined with `store_soft_labels`")
    if o.threads_per_worker < 1:
        raise ConfigError("threads_per_worker", f"must be a positive integer (got {o.threads_per_worker})")


def _config(req: PosttrainRequest, run: dict, images: torch.Tensor) -> DistillConfig:
    """The post-train's configuration: the distill run's data, then the config file, then the flags; the
    dataset named by the teacher when nothing else names it."""
    values = {**run, **flatten(req.file or {}), **req.given}
    if "dataset" not in values:
        teacher = load_checkpoint_arg(teacher_paths(values["teacher"])[0], "teacher")
        if teacher.meta.get("dataset") not in data.names():
            raise ConfigError("dataset", f"cannot tell the dataset of {req.opts.distilled}; name it")
        values["dataset"] = teacher.meta["dataset"]
    values.setdefault("image_size", int(images.shape[-1]))
    cfg = build_config(values, run=False)
    if cfg.num_gpus > 0 and not cfg.address and cfg.num_gpus > torch.cuda.device_count():
        raise ConfigError("num_gpus", f"asked for {cfg.num_gpus} GPUs but {torch.cuda.device_count()} are visible")
    return cfg


def prepare_posttrain(req: PosttrainRequest) -> tuple[PosttrainJob, DistillConfig, torch.Tensor, torch.Tensor]:
    """Every check, before anything is written; returns (job, configuration, images, class ids)."""
    _check_request(req)
    o = req.opts
    images, class_ids, src, run, ipc_indices = _read_source(o.distilled)
    cfg = _config(req, run, images)
    committee = {p: load_checkpoint_arg(p, "teacher") for p in teacher_paths(cfg.teacher)}  # one, or several
    try:
        test = cfg.split("test")
    except DataError as e:
        raise ConfigError("data_dir", e.message) from None
    info = test.info
    for path, ckpt in committee.items():
        if ckpt.num_classes != info.num_classes:
            raise ConfigError("teacher", f"{path} has {ckpt.num_classes} classes but the distilled "
                                         f"data ({cfg.dataset}) has {info.num_classes}")
    teacher = tuple(committee.values()) if len(committee) > 1 else next(iter(committee.values()))
    if int(class_ids.max()) >= info.num_classes:
        raise ConfigError("distilled", f"class id {int(class_ids.max())} is out of range for {cfg.dataset}")
    _check_plan(req, src, class_ids, ipc_indices, info.num_classes)
    pcfg = cfg.posttrain
    if pcfg.labels == "hard" and (o.soft_labels or o.store_soft_labels):
        raise ConfigError("posttrain.labels", "hard labels use no teacher: no soft labels to read or store")
    digest = images_digest(images)
    if o.soft_labels:
        check_soft_labels(o.soft_labels, pcfg, digest, info.num_classes, len(images), cfg.posttrain_workers)
    job = PosttrainJob(source=src, images_digest=digest, num_images=len(images), teacher=teacher, test=test,
                       info=info, cfg=pcfg, image_size=cfg.image_size, small_input=cfg.small_input, seed=cfg.seed,
                       soft_labels=o.soft_labels, topk=o.topk,
                       store_soft_labels=os.path.join(o.out, "soft_labels") if o.store_soft_labels else None)
    check_out_dir(o.out, POSTTRAIN_RUN_FILE, job.fingerprint(), "posttrain run")
    check_not_busy(o.out)
    try:
        connect(cfg.address)
    except ConnectionError as e:
        raise ConfigError("address", str(e)) from None
    check_workers(job, cfg.posttrain_workers, cfg.num_gpus > 0, o.threads_per_worker, "posttrain_workers")
    return job, cfg, images, class_ids


def run(req: PosttrainRequest, job: PosttrainJob, run_cfg: DistillConfig, images: torch.Tensor, class_ids) -> dict:
    """Train (or resume) the student under OUT/train/, then write student.pt, grid.png and posttrain.json;
    OUT is this process's alone meanwhile (a second run on it is refused before it writes anything)."""
    with lock_out_dir(req.opts.out):
        return _run(req, job, run_cfg, images, class_ids)


def _run(req: PosttrainRequest, job: PosttrainJob, run_cfg: DistillConfig, images: torch.Tensor, class_ids) -> dict:
    cfg, info, out, o = job.cfg, job.info, req.opts.out, req.opts
    dataset, workers = run_cfg.dataset, run_cfg.posttrain_workers
    fp = job.fingerprint()
    for path in sweep_temp_files(out):  # OUT is ours alone (the lock): a temp file here is a killed write's
        log.warning("removed %s, left by a write that was killed", path)
    atomic_write_json(os.path.join(out, POSTTRAIN_RUN_FILE), {"fingerprint": fp, "config": dataclasses.asdict(cfg),
                                                              "distilled": o.distilled, "teacher": run_cfg.teacher,
                                                              "seed": run_cfg.seed})
    if job.store_soft_labels:
        atomic_write_json(os.path.join(job.store_soft_labels, SOFT_META), soft_label_meta(job, False, workers))
    res = run_posttrain(job, storage_path=os.path.join(out, "train"), name=f"student-{fp}", num_workers=workers,
                        use_gpu=run_cfg.num_gpus > 0, threads=o.threads_per_worker)
    if job.store_soft_labels:
        atomic_write_json(os.path.join(job.store_soft_labels, SOFT_META), soft_label_meta(job, True, workers))
    student = create_model(cfg.student, info.num_classes, cfg.student_width, job.small_input)
    student.load_state_dict(res.student_state)
    save_checkpoint(os.path.join(out, "student.pt"), student, arch=cfg.student, width=cfg.student_width,
                    num_classes=info.num_classes, image_size=job.image_size, small_input=job.small_input,
                    mean=info.mean, std=info.std, method="student", meta={"dataset": dataset})
    save_grid(os.path.join(out, "grid.png"), images, class_ids, info.class_names)
    result = {"distilled": o.distilled, "teacher": run_cfg.teacher, "dataset": dataset, "num_images": int(len(images)),
              "top1": round(res.top1, 3), "posttrain_seconds": None if res.seconds is None else round(res.seconds, 2),
              "startup_seconds": None if res.startup_seconds is None else round(res.startup_seconds, 2),
              "num_workers": workers, "epochs": res.epochs, "steps": res.steps,
              "trained_epochs": res.trained_epochs, "seed": run_cfg.seed, "soft_labels": o.soft_labels,
              "stored_soft_labels": job.store_soft_labels, "history": res.history,
              "config": dataclasses.asdict(cfg)}
    atomic_write_json(os.path.join(out, "posttrain.json"), result)
    return result
