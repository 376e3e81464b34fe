"""The `distill` pipeline: squeeze (or load) a backbone, recover shards, export,
post-train a student, and write report.json.

`prepare` does every check that can fail on user input before anything is
written; `run` then owns the output directory. A rerun with the same
configuration resumes: cached backbones and finished shards are reused.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .bn import parse_bn_weights
from .config import ConfigError, DistillConfig
from .data import DataError, DatasetInfo, dataset_info, load_split, sample_per_class
from .evaluation import top1
from .models import (Checkpoint, CheckpointError, NotOurCheckpoint, frozen, import_backbone, load_checkpoint,
                     model_from_import, num_bn_layers, save_checkpoint)
from .report import save_grid, write_report
from .squeeze import linear_probe, squeeze
from .store import ShardStore, StoreError, atomic_write_json, export_imagefolder

log = logging.getLogger("scdd_ray")
RUN_FILE = "run.json"


class Renormalize(nn.Module):
    """Feed a model trained with other mean/std: re-map normalised inputs first."""

    def __init__(self, model: nn.Module, from_mean, from_std, to_mean, to_std):
        super().__init__()
        self.model = model
        fm, fs = torch.tensor(from_mean).view(1, -1, 1, 1), torch.tensor(from_std).view(1, -1, 1, 1)
        tm, ts = torch.tensor(to_mean).view(1, -1, 1, 1), torch.tensor(to_std).view(1, -1, 1, 1)
        self.register_buffer("scale", fs / ts)
        self.register_buffer("shift", (fm - tm) / ts)

    def forward(self, x):
        return self.model(x * self.scale + self.shift)


def adapt_inputs(model: nn.Module, ckpt: Checkpoint, info: DatasetInfo) -> nn.Module:
    if np.allclose(ckpt.mean, info.mean, atol=1e-4) and np.allclose(ckpt.std, info.std, atol=1e-4):
        return model
    return Renormalize(model, info.mean, info.std, ckpt.mean, ckpt.std)


def check_checkpoint(ckpt: Checkpoint, cfg: DistillConfig, info: DatasetInfo, flag: str, path: str,
                     match_arch: bool) -> None:
    if ckpt.num_classes != info.num_classes:
        raise ConfigError(flag, f"{path} has {ckpt.num_classes} classes but {cfg.dataset} has {info.num_classes}")
    if match_arch and (ckpt.arch != cfg.arch or abs(ckpt.width - cfg.width) > 1e-9):
        raise ConfigError(flag, f"{path} is {ckpt.arch} width {ckpt.width} but --arch {cfg.arch} "
                                f"--width {cfg.width} was asked for")
    if ckpt.image_size != cfg.image_size:
        raise ConfigError(flag, f"{path} was trained at image size {ckpt.image_size}, this run uses "
                                f"{cfg.image_size} (BN statistics depend on resolution)")


@dataclass
class Prepared:
    cfg: DistillConfig
    info: DatasetInfo
    backbone: Checkpoint | None
    teacher: Checkpoint | None


def load_checkpoint_arg(path: str, flag: str, info: DatasetInfo | None = None, image_size: int | None = None,
                        allow_probe: bool = False) -> Checkpoint:
    """Load a user-named checkpoint; failures become a ConfigError naming the flag.

    With `info`, public checkpoints (torchvision, MoCo-v2/v3, DINO, SwAV) are
    imported too. One that lacks a classifier for the dataset's classes is
    returned with `meta["needs_probe"]` when `allow_probe`, else refused.
    """
    try:
        return load_checkpoint(path)
    except NotOurCheckpoint as e:
        if info is None:
            raise ConfigError(flag, str(e)) from None
    except CheckpointError as e:
        raise ConfigError(flag, str(e)) from None
    try:
        imp = import_backbone(path)
        model, has_head = model_from_import(imp, info.num_classes)
    except CheckpointError as e:
        raise ConfigError(flag, str(e)) from None
    if not has_head and not allow_probe:
        raise ConfigError(flag, f"{path} ({imp.layout} layout) has no classifier for {info.num_classes} classes; "
                                f"fit one first: scdd-ray squeeze --dataset {info.name} --from {path} --out PROBED.pt")
    return Checkpoint(arch=imp.arch, width=imp.width, num_classes=info.num_classes,
                      image_size=image_size or info.image_size, small_input=imp.small_input, mean=info.mean,
                      std=info.std, method=imp.layout, state_dict=model.state_dict(),
                      meta={"imported_from": os.path.abspath(path), "layout": imp.layout,
                            "dropped_keys": len(imp.dropped), "needs_probe": not has_head})


def prepare(cfg: DistillConfig) -> Prepared:
    """All input checks; raises ConfigError (flag named) and writes nothing."""
    try:
        info = dataset_info(cfg.dataset, cfg.data_dir, cfg.image_size)
    except DataError as e:
        raise ConfigError("", str(e)) from None
    backbone = teacher = None
    if cfg.backbone:
        backbone = load_checkpoint_arg(cfg.backbone, "--backbone", info, cfg.image_size, allow_probe=True)
        check_checkpoint(backbone, cfg, info, "--backbone", cfg.backbone, match_arch=True)
    if cfg.teacher:
        teacher = load_checkpoint_arg(cfg.teacher, "--teacher", info, cfg.image_size)
        check_checkpoint(teacher, cfg, info, "--teacher", cfg.teacher, match_arch=False)
    if cfg.method != "random":
        spec = parse_bn_weights(cfg.recover.bn_weights)  # the grammar was validated with the config
        if spec.kind == "list":
            n = num_bn_layers(backbone.arch if backbone else cfg.arch)
            if len(spec.params) != n:
                raise ConfigError("--bn-weights", f"lists {len(spec.params)} weights but {cfg.arch} has {n} "
                                                  "BatchNorm2d layers (one weight per layer)")
    check_out_dir(cfg)
    if cfg.address:  # an existing cluster: its GPUs may sit on other nodes
        from .engine import cluster_gpus, connect

        try:
            connect(cfg.address)
        except ConnectionError as e:
            raise ConfigError("--address", str(e)) from None
        gpus = cluster_gpus()
        if cfg.num_gpus > gpus:
            raise ConfigError("--num-gpus", f"asked for {cfg.num_gpus} GPUs but the Ray cluster has {gpus}")
        resources = None
    elif cfg.num_gpus > torch.cuda.device_count():
        # A private local Ray instance sees exactly this machine's GPUs.
        raise ConfigError("--num-gpus", f"asked for {cfg.num_gpus} GPUs but {torch.cuda.device_count()} are visible")
    else:
        resources = None if _ray_running() else {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}
    from .posttrain import placement

    batch = min(cfg.posttrain.batch_size, info.num_classes * cfg.ipc)
    if cfg.posttrain_workers > batch:
        raise ConfigError("--posttrain-workers", f"{cfg.posttrain_workers} workers cannot share a batch of {batch} images")
    placement(cfg.posttrain_workers, cfg.num_gpus > 0, 1, "--posttrain-workers", resources)
    return Prepared(cfg, info, backbone, teacher)


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def num_workers(cfg: DistillConfig) -> int:
    """One actor per GPU; on CPU --num-workers, by default one per core (one thread each)."""
    if cfg.num_gpus > 0:
        return cfg.num_gpus
    return cfg.num_workers or os.cpu_count() or 1


def uses_ray(cfg: DistillConfig) -> bool:
    # A single local worker runs in this process: an actor would only add start-up time.
    return bool(cfg.address) or num_workers(cfg) > 1


def check_out_dir(cfg: DistillConfig) -> None:
    """--out must be new, empty, or a previous run of the same configuration."""
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError("--out", f"{out} exists and is not a directory")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    run_file = os.path.join(out, RUN_FILE)
    if not os.path.isfile(run_file):
        raise ConfigError("--out", f"{out} is not empty and holds no scdd-ray run (no {RUN_FILE}); choose a new directory")
    import json

    try:
        with open(run_file) as f:
            prev = json.load(f)
    except (OSError, ValueError):
        raise ConfigError("--out", f"{run_file} is unreadable; choose a new directory") from None
    if prev.get("fingerprint") != cfg.fingerprint():
        diff = _diff(prev.get("config", {}), cfg.to_dict())
        raise ConfigError("--out", f"{out} holds a different run ({diff}); choose a new directory or the same settings")
    try:
        ShardStore(os.path.join(out, "distilled")).check(cfg.fingerprint())
    except StoreError as e:
        raise ConfigError("--out", str(e)) from None


def _diff(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) & set(b)):
        if k in ("out", "num_gpus", "num_workers", "address", "teacher", "posttrain", "posttrain_workers"):
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _diff(va, vb, prefix + k + ".")
            if d:
                return d
        elif va != (list(vb) if isinstance(vb, tuple) else vb):
            return f"{prefix}{k} was {va!r}, now {vb!r}"
    return "settings differ"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(cfg: DistillConfig) -> torch.device:
    return torch.device("cuda") if cfg.num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def backbone_name(cfg: DistillConfig, squeeze_method: str | None = None) -> str:
    """File name under OUT/backbones/ of the backbone `distill` squeezes for `cfg`."""
    return (f"{squeeze_method or cfg.squeeze.method}-{cfg.arch}-w{cfg.width:g}-s{cfg.image_size}-e{cfg.squeeze.epochs}"
            f"-seed{cfg.seed}.pt")


def get_backbone(cfg: DistillConfig, info: DatasetInfo, squeeze_method: str, device) -> tuple[Checkpoint, str]:
    """Load the cached backbone for `squeeze_method`, or train and cache it under OUT/backbones/."""
    sq = dataclasses.replace(cfg.squeeze, method=squeeze_method)
    path = os.path.join(cfg.out, "backbones", backbone_name(cfg, squeeze_method))
    if os.path.isfile(path):
        log.info("using cached backbone %s", path)
        return load_checkpoint(path), path
    train = load_split(cfg.dataset, "train", cfg.data_dir, cfg.image_size)
    t0 = time.perf_counter()
    model = squeeze(train, cfg.arch, cfg.width, sq, device=device, seed=cfg.seed, small_input=cfg.small_input)
    test = load_split(cfg.dataset, "test", cfg.data_dir, cfg.image_size)
    acc = top1(model, test, info.mean, info.std, device)
    seconds = time.perf_counter() - t0
    log.info("squeeze %s: %.0fs, test top-1 %.2f%%", squeeze_method, seconds, acc)
    save_checkpoint(path, model, arch=cfg.arch, width=cfg.width, num_classes=info.num_classes,
                    image_size=cfg.image_size, small_input=cfg.small_input, mean=info.mean, std=info.std,
                    method=squeeze_method, meta={"dataset": cfg.dataset, "epochs": sq.epochs, "seed": cfg.seed,
                                                 "test_top1": acc, "seconds": seconds})
    return load_checkpoint(path), path


def probe_backbone(cfg: DistillConfig, info: DatasetInfo, ckpt: Checkpoint, device) -> tuple[Checkpoint, str]:
    """Fit the linear head of an imported SSL backbone (frozen, BN in eval mode); cached under OUT/backbones/."""
    src = os.path.splitext(os.path.basename(ckpt.meta["imported_from"]))[0]
    name = f"probe-{ckpt.method}-{src}-{ckpt.arch}-s{cfg.image_size}-p{cfg.squeeze.probe_epochs}-seed{cfg.seed}.pt"
    path = os.path.join(cfg.out, "backbones", name)
    if os.path.isfile(path):
        log.info("using cached probed backbone %s", path)
        return load_checkpoint(path), path
    model = ckpt.build().to(device, memory_format=torch.channels_last)
    train = load_split(cfg.dataset, "train", cfg.data_dir, cfg.image_size)
    t0 = time.perf_counter()
    linear_probe(model, train, cfg.squeeze, device, cfg.seed)
    acc = top1(model, load_split(cfg.dataset, "test", cfg.data_dir, cfg.image_size), info.mean, info.std, device)
    log.info("linear probe on imported %s backbone: test top-1 %.2f%%", ckpt.method, acc)
    meta = {**ckpt.meta, "needs_probe": False, "dataset": cfg.dataset, "probe_epochs": cfg.squeeze.probe_epochs,
            "seed": cfg.seed, "test_top1": acc, "seconds": time.perf_counter() - t0}
    save_checkpoint(path, model, arch=ckpt.arch, width=ckpt.width, num_classes=info.num_classes,
                    image_size=cfg.image_size, small_input=ckpt.small_input, mean=info.mean, std=info.std,
                    method=ckpt.method, meta=meta)
    return load_checkpoint(path), path


def select_random(store: ShardStore, cfg: DistillConfig, info: DatasetInfo) -> dict:
    """The `random` baseline: IPC random real training images per class, one shard per IPC index."""
    train = load_split(cfg.dataset, "train", cfg.data_dir, cfg.image_size)
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


def run(prep: Prepared) -> dict:
    cfg, info = prep.cfg, prep.info
    seed_everything(cfg.seed)
    device = pick_device(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(os.path.join(cfg.out, RUN_FILE), {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()})
    t_start = time.perf_counter()

    # Backbone for recovery (scdd: SSL + probe; sre2l: supervised); random needs none.
    backbone, backbone_path = (prep.backbone, cfg.backbone) if prep.backbone else (None, None)
    if backbone is None and cfg.method != "random":
        backbone, backbone_path = get_backbone(cfg, info, cfg.squeeze.method, device)
    elif backbone is not None and backbone.meta.get("needs_probe"):
        backbone, backbone_path = probe_backbone(cfg, info, backbone, device)
    # Teacher for relabelling: --teacher, else the recovery backbone; the random
    # baseline gets the supervised teacher, the strongest we have.
    if prep.teacher is not None:
        teacher_ckpt, teacher_path = prep.teacher, cfg.teacher
    elif backbone is not None:
        teacher_ckpt, teacher_path = backbone, backbone_path
    else:
        teacher_ckpt, teacher_path = get_backbone(cfg, info, "supervised", device)

    store = ShardStore(os.path.join(cfg.out, "distilled"))
    try:
        store.open(cfg.fingerprint(), {"dataset": cfg.dataset, "method": cfg.method, "ipc": cfg.ipc})
    except StoreError as e:
        raise ConfigError("--out", str(e)) from None
    t0 = time.perf_counter()
    if cfg.method == "random":
        stats = select_random(store, cfg, info)
    else:
        from .engine import plan_shards, run_local, run_ray

        shards = plan_shards(info.num_classes, cfg.ipc, cfg.recover.classes_per_batch)
        train = load_split(cfg.dataset, "train", cfg.data_dir, cfg.image_size) if cfg.recover.init == "real" else None
        if uses_ray(cfg):
            from .engine import connect

            connect(cfg.address)
            stats = run_ray(backbone, shards, store, cfg.recover, cfg.image_size, cfg.seed, num_workers=num_workers(cfg),
                            use_gpu=cfg.num_gpus > 0, threads=1, train=train)
        else:
            model = frozen(backbone.build().to(device, memory_format=torch.channels_last))
            stats = run_local(model, shards, store, cfg.recover, backbone.mean, backbone.std, cfg.image_size,
                              cfg.seed, device, train)
    recover_seconds = time.perf_counter() - t0

    images, class_ids, ipc_idx = store.read()
    export_imagefolder(os.path.join(cfg.out, "images"), images, class_ids, ipc_idx)
    save_grid(os.path.join(cfg.out, "grid.png"), images, class_ids, info.class_names)

    from .engine import connect
    from .posttrain import PosttrainJob, run_posttrain
    from .store import images_digest

    test = load_split(cfg.dataset, "test", cfg.data_dir, cfg.image_size)
    teacher = adapt_inputs(teacher_ckpt.build(), teacher_ckpt, info)
    teacher_top1 = top1(teacher, test, info.mean, info.std)
    # The same Ray Train post-train as `scdd-ray posttrain`, run under OUT/posttrain/.
    job = PosttrainJob(source=store.root, images_digest=images_digest(images), num_images=len(images),
                       teacher=teacher_ckpt, test=test, info=info, cfg=cfg.posttrain, image_size=cfg.image_size,
                       small_input=cfg.small_input, seed=cfg.seed)
    connect(cfg.address)
    pt = run_posttrain(job, storage_path=os.path.join(cfg.out, "posttrain"), name=f"student-{job.fingerprint()}",
                       num_workers=cfg.posttrain_workers, use_gpu=cfg.num_gpus > 0, flag="--posttrain-workers")
    report = {
        "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width, "ipc": cfg.ipc,
        "num_classes": info.num_classes, "num_images": int(len(images)), "image_size": cfg.image_size,
        "top1": round(pt.top1, 3), "teacher_top1": round(teacher_top1, 3), "teacher": teacher_path,
        "teacher_method": teacher_ckpt.method, "backbone": backbone_path,
        "backbone_method": backbone.method if backbone else None,
        "recover_seconds": round(recover_seconds, 2), "posttrain_seconds": round(pt.seconds, 2),
        "posttrain_startup_seconds": None if pt.startup_seconds is None else round(pt.startup_seconds, 2),
        "posttrain_workers": pt.num_workers,
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "num_workers": stats.get("num_workers", 1), "device": str(device), "seed": cfg.seed,
        "shards_total": stats["shards_total"], "shards_computed": stats["shards_computed"],
        "student": cfg.posttrain.student, "student_width": cfg.posttrain.student_width,
        "posttrain_epochs": cfg.posttrain.epochs, "posttrain_history": pt.history,
        "config": cfg.to_dict(), "torch": torch.__version__,
    }
    write_report(os.path.join(cfg.out, "report.json"), report)
    return report
