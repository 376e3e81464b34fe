"""The `distill` pipeline: squeeze (or load) a backbone, recover shards, export,
post-train a student, and write report.json.

`prepare` does every check that can fail on user input before anything is
written; `run` then owns the output directory. A rerun with the same
configuration resumes: cached backbones and finished shards are reused.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..backbones import Models, check_checkpoint, load_checkpoint_arg, resolve_models
from ..class_stats import cached_class_statistics
from ..config import RUN_FILE, flatten
from ..core.bn import parse_bn_weights
from ..core.configs import fingerprint_view
from ..core.evaluation import top1
from ..core.committee import members
from ..core.posttrain import build_teacher, global_batch
from ..core.posttrain_job import PosttrainJob
from ..core.shards import plan_shards, run_local
from ..data import DatasetInfo, sample_per_class
from ..dist.cluster import cluster_gpus, connect, is_running, local_resources, placement
from ..dist.posttrain import run_posttrain
from ..dist.synthesis import run_ray
from ..errors import ConfigError, StoreError
from ..exports import export_all
from ..locks import FileLock
from ..models.checkpoint import Checkpoint
from ..models.factory import num_bn_layers
from ..models.runtime import frozen
from ..report import write_report
from ..schema import TEACHER_BACKBONE, DistillConfig, teacher_paths
from ..store.atomic import atomic_write_json, sweep_temp_files
from ..store.distilled import plan_problem
from ..store.encoded import images_digest
from ..store.shards import ShardStore
from .outdir import check_not_busy, check_out_dir, lock_out_dir

log = logging.getLogger("scdd_ray")


@dataclass
class Prepared:
    cfg: DistillConfig
    info: DatasetInfo
    backbone: Checkpoint | None
    teacher: dict[str, Checkpoint] | None  # the named teacher checkpoint(s), by path
    lock: FileLock | None = None  # this process's hold on `out`, from the end of `prepare` to the end of `run`


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def prepare(cfg: DistillConfig) -> Prepared:
    """All input checks; raises ConfigError (naming the field) and writes nothing."""
    check_not_busy(cfg.out)  # before the slow checks: another run there is refused at once
    # The split top-1 is measured on: `holdout` runs never read the test split, so need none.
    info = cfg.split("test").info
    backbone = teacher = None
    if cfg.backbone:
        backbone = load_checkpoint_arg(cfg.backbone, "backbone", info, cfg.image_size, allow_probe=True)
        check_checkpoint(backbone, cfg, info, "backbone", cfg.backbone, match_arch=True)
    if cfg.teacher and cfg.teacher != TEACHER_BACKBONE:  # one checkpoint, or a committee of several
        teacher = {}
        for path in teacher_paths(cfg.teacher):
            teacher[path] = load_checkpoint_arg(path, "teacher", info, cfg.image_size)
            check_checkpoint(teacher[path], cfg, info, "teacher", path, match_arch=False)
    if cfg.method != "random":
        spec = parse_bn_weights(cfg.recover.bn_weights)  # the grammar was validated with the config
        if spec.kind == "list":
            n = num_bn_layers(backbone.arch if backbone else cfg.arch)
            if len(spec.params) != n:
                raise ConfigError("recover.bn_weights", f"lists {len(spec.params)} weights but {cfg.arch} has {n} "
                                                        "BatchNorm2d layers (one weight per layer)")
        if cfg.recover.augment_per == "batch" and cfg.recover.crop_scale is None and not cfg.recover.flip:
            # Jitter is one shift per batch either way: the option has nothing to act on.
            log.warning("recover.augment_per batch changes nothing here: this preset's recover has no crop and "
                        "no flip (see recover.crop_scale, recover.flip)")
    check_out_dir(cfg.out, RUN_FILE, cfg.fingerprint(), "scdd-ray run",
                  describe_change=lambda prev: _diff(prev.get("config", {}), cfg))
    store = ShardStore(os.path.join(cfg.out, "distilled"))
    try:
        recorded = store.check(cfg.fingerprint())["shards"]
    except StoreError as e:
        raise ConfigError("out", e.message) from None
    stray = sorted(set(recorded) - planned_shard_ids(cfg, info))
    if stray:  # same configuration, yet a shard this run never plans: it came from elsewhere
        raise ConfigError("out", f"{store.manifest_path} lists shard {stray[0]}, which this run does not plan; it "
                                 "is not this run's: remove its entry, or choose a new directory")
    _check_placement(cfg, info)
    return Prepared(cfg, info, backbone, teacher, lock_out_dir(cfg.out))


def planned_shard_ids(cfg: DistillConfig, info: DatasetInfo) -> set[str]:
    """The ids of every shard this run computes (`random`: one per IPC index)."""
    if cfg.method == "random":
        return {f"ipc{j:04d}-real" for j in range(cfg.ipc)}
    return {s.id for s in plan_shards(info.num_classes, cfg.ipc, cfg.recover.classes_per_batch,
                                      cfg.recover.ipc_per_shard)}


def planned_per_class(cfg: DistillConfig, info: DatasetInfo) -> list[int]:
    """Images of each class the finished run holds: `ipc`, or for `random` fewer where a class has fewer
    training images (recorded in the manifest, for `posttrain` to check the set against)."""
    if cfg.method != "random":
        return [cfg.ipc] * info.num_classes
    counts = np.bincount(cfg.split("train").labels.numpy(), minlength=info.num_classes)
    return [int(min(cfg.ipc, n)) for n in counts]


def _check_placement(cfg: DistillConfig, info: DatasetInfo) -> None:
    if cfg.address:  # an existing cluster: its GPUs may sit on other nodes
        try:
            connect(cfg.address)
        except ConnectionError as e:
            raise ConfigError("address", str(e)) from None
        gpus = cluster_gpus()
        if cfg.num_gpus > gpus:
            raise ConfigError("num_gpus", f"asked for {cfg.num_gpus} GPUs but the Ray cluster has {gpus}")
        resources = None
    elif cfg.num_gpus > torch.cuda.device_count():
        # A private local Ray instance sees exactly this machine's GPUs.
        raise ConfigError("num_gpus", f"asked for {cfg.num_gpus} GPUs but {torch.cuda.device_count()} are visible")
    else:
        resources = None if is_running() else local_resources()
    batch = global_batch(cfg.posttrain, info.num_classes * cfg.ipc, cfg.posttrain_workers)
    if cfg.posttrain_workers > batch:
        raise ConfigError("posttrain_workers", f"{cfg.posttrain_workers} workers cannot share a batch of {batch} "
                                               "images")
    placement(cfg.posttrain_workers, cfg.num_gpus > 0, 1, "posttrain_workers", resources)
    if uses_ray(cfg) and cfg.method != "random":  # synthesis actors: an unplaceable one would be waited for
        placement(num_workers(cfg), cfg.num_gpus > 0, 1, "num_gpus" if cfg.num_gpus else "num_workers", resources)


def num_workers(cfg: DistillConfig) -> int:
    """One actor per GPU; on CPU `num_workers`, by default one per core (one thread each)."""
    if cfg.num_gpus > 0:
        return cfg.num_gpus
    return cfg.num_workers or os.cpu_count() or 1


def uses_ray(cfg: DistillConfig) -> bool:
    # A single local worker runs in this process: an actor would only add start-up time.
    return bool(cfg.address) or num_workers(cfg) > 1


def _diff(prev: dict, cfg: DistillConfig) -> str:
    """The first setting that decides the images and differs between a run's earlier config and `cfg`."""
    now = flatten(fingerprint_view(cfg))
    try:
        before = flatten(prev)
    except ConfigError:  # a run.json of another shape: say only that it differs
        return "settings differ"
    for k in sorted(set(before) & set(now)):
        if before[k] != now[k]:
            return f"{k} was {before[k]!r}, now {now[k]!r}"
    return "settings differ"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(cfg: DistillConfig) -> torch.device:
    """The driver's device: squeeze, the teacher's top-1 and in-process recover run on it."""
    if cfg.num_gpus > 0 and not torch.cuda.is_available():  # prepare() refused this without `address`
        log.warning("no CUDA device on this node: squeeze and the teacher's top-1 run on its CPU; recover and "
                    "post-train still use the cluster's GPUs")
    return torch.device("cuda") if cfg.num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def release_gpu(device: torch.device) -> None:
    """Hand the driver's cached GPU memory back before Ray places actors or workers on the same GPU:
    the driver keeps only its CUDA context there."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def select_random(store: ShardStore, cfg: DistillConfig) -> dict:
    """The `random` baseline: IPC random real training images per class, one shard per IPC index."""
    train = cfg.split("train")
    idx, pos = sample_per_class(train, cfg.ipc, cfg.seed)
    labels = train.labels.numpy()[idx]
    computed = 0
    for j in range(cfg.ipc):
        sel = pos == j
        if not sel.any():
            continue
        shard_id = f"ipc{j:04d}-real"
        if store.write_shard(shard_id, labels[sel], pos[sel], train.load(idx[sel])):
            computed += 1
    return {"shards_total": cfg.ipc, "shards_computed": computed, "num_workers": 1}


def _models(prep: Prepared, device) -> Models:
    """The run's recovery backbone and relabelling teacher (backbones.plan_models decides which)."""
    given = {**(prep.teacher or {}), **({prep.cfg.backbone: prep.backbone} if prep.backbone is not None else {})}
    return resolve_models(prep.cfg, prep.info, device, given)


def _recover(cfg: DistillConfig, info: DatasetInfo, store: ShardStore, backbone: Checkpoint | None, device) -> dict:
    if cfg.method == "random":
        return select_random(store, cfg)
    shards = plan_shards(info.num_classes, cfg.ipc, cfg.recover.classes_per_batch, cfg.recover.ipc_per_shard)
    train = cfg.split("train") if cfg.recover.init == "real" else None
    stats = cached_class_statistics(cfg, backbone, device) if cfg.recover.class_bn_coef > 0 else None
    if uses_ray(cfg):
        connect(cfg.address)
        return run_ray(backbone, shards, store, cfg.recover, cfg.image_size, cfg.seed, num_workers=num_workers(cfg),
                       use_gpu=cfg.num_gpus > 0, threads=1, train=train, class_stats=stats)
    model = frozen(backbone.build().to(device, memory_format=torch.channels_last))
    return run_local(model, shards, store, cfg.recover, backbone.mean, backbone.std, cfg.image_size, cfg.seed,
                     device, train, class_stats=stats)


def run(prep: Prepared) -> dict:
    """The whole run, holding `out` (the lock `prepare` took) until it ends, however it ends."""
    try:
        return _run(prep)
    finally:
        if prep.lock is not None:
            prep.lock.release()


def _run(prep: Prepared) -> dict:
    cfg, info = prep.cfg, prep.info
    seed_everything(cfg.seed)
    device = pick_device(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    for path in sweep_temp_files(cfg.out):  # OUT is ours alone (the lock): a temp file here is a killed write's
        log.warning("removed %s, left by a write that was killed", path)
    atomic_write_json(os.path.join(cfg.out, RUN_FILE), {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()})
    t_start = time.perf_counter()
    models = _models(prep, device)
    backbone, backbone_path, teacher_ckpt, teacher_path = (models.backbone, models.backbone_path, models.teacher,
                                                           models.teacher_path)
    release_gpu(device)

    store = ShardStore(os.path.join(cfg.out, "distilled"))
    per_class = planned_per_class(cfg, info)
    try:
        store.open(cfg.fingerprint(), {"dataset": cfg.dataset, "method": cfg.method, "ipc": cfg.ipc,
                                       "num_classes": info.num_classes, "per_class": per_class})
    except StoreError as e:
        raise ConfigError("out", e.message) from None
    dropped = store.verify(repair=True)
    for path, why in dropped:  # damaged at rest since it was written: computed again below
        log.warning("distilled: %s is damaged (%s); computing it again", path, why)
    t0 = time.perf_counter()
    stats = _recover(cfg, info, store, backbone, device)
    recover_seconds = time.perf_counter() - t0

    images, class_ids, ipc_idx = store.read()
    outside, missing = plan_problem(class_ids, ipc_idx, per_class)
    if outside or missing:  # never exported or trained on: the set is not this run's plan
        raise StoreError(f"{store.root} holds {outside or missing}; rerun the same command, or choose a new "
                         "directory")
    export_all(cfg.out, images, class_ids, ipc_idx, info.class_names)

    test = cfg.split("test")
    teacher_top1 = top1(build_teacher(teacher_ckpt, info, device, cfg.posttrain), test, info.mean, info.std, device)
    release_gpu(device)
    # The same Ray Train post-train as `scdd-ray posttrain`, run under OUT/posttrain/.
    job = PosttrainJob(source=store.root, images_digest=images_digest(images), num_images=len(images),
                       teacher=teacher_ckpt, test=test, info=info, cfg=cfg.posttrain, image_size=cfg.image_size,
                       small_input=cfg.small_input, seed=cfg.seed)
    connect(cfg.address)
    pt = run_posttrain(job, storage_path=os.path.join(cfg.out, "posttrain"), name=f"student-{job.fingerprint()}",
                       num_workers=cfg.posttrain_workers, use_gpu=cfg.num_gpus > 0)
    report = {
        "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width, "ipc": cfg.ipc,
        "num_classes": info.num_classes, "num_images": int(len(images)), "image_size": cfg.image_size,
        "top1": round(pt.top1, 3), "teacher_top1": round(teacher_top1, 3), "evaluated_on": cfg.eval_split,
        "teacher": teacher_path,
        "teacher_method": ",".join(c.method for c in members(teacher_ckpt)), "backbone": backbone_path,
        "backbone_method": backbone.method if backbone else None,
        "recover_seconds": round(recover_seconds, 2), "recover_actor_seconds": _round(store.recover_seconds()),
        "posttrain_seconds": _round(pt.seconds),
        "posttrain_startup_seconds": _round(pt.startup_seconds),
        "posttrain_workers": pt.num_workers,
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "num_workers": stats.get("num_workers", 1), "device": str(device), "seed": cfg.seed,
        "shards_total": stats["shards_total"], "shards_computed": stats["shards_computed"],
        "shards_repaired": [os.path.basename(p) for p, _ in dropped],
        "actor_restarts": stats.get("restarts", 0),
        "student": cfg.posttrain.student, "student_width": cfg.posttrain.student_width,
        "posttrain_epochs": cfg.posttrain.epochs, "posttrain_history": pt.history,
        "config": cfg.to_dict(), "torch": torch.__version__,
    }
    write_report(os.path.join(cfg.out, "report.json"), report)
    return report
