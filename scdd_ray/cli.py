"""`scdd-ray` command line: parse flags into configs, validate, run.

Every user-facing error is one line `scdd-ray: error: ...` with exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from .config import (ARCHS, DATASETS, METHODS, MIXES, OPTIMIZERS, PRESETS, SQUEEZE_METHODS, ConfigError,
                     PosttrainConfig, SqueezeConfig, build_distill_config, parse_scale, recovery_grid_problem,
                     validate_arch, validate_posttrain, validate_squeeze)

log = logging.getLogger("scdd_ray")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        raise UsageError(message)


def _add_common_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=None, help="local dataset directory (CIFAR python layout or ImageFolder)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (preset if omitted)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> Parser:
    ap = Parser(prog="scdd-ray", description="SC-DD dataset distillation, from a laptop CPU to a Ray cluster.")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    d = sub.add_parser("distill", help="squeeze, recover, relabel and post-train; writes OUT/report.json")
    _add_common_data(d)
    d.add_argument("--out", required=True)
    d.add_argument("--arch", default=None, help=f"recovery backbone: {', '.join(ARCHS)} or timm:<name>")
    d.add_argument("--width", type=float, default=None, help="channel width multiplier (1.0 = paper's model)")
    d.add_argument("--ipc", type=int, default=None, help="images per class")
    d.add_argument("--method", default="scdd", help=f"one of {', '.join(METHODS)}")
    d.add_argument("--backbone", default=None, help="checkpoint to recover from (default: squeeze one, cached)")
    d.add_argument("--teacher", default=None, help="checkpoint that relabels crops (default: the backbone)")
    d.add_argument("--ssl", default=None, help="SSL objective for scdd backbones: simclr or mocov3")
    d.add_argument("--squeeze-epochs", type=int, default=None)
    d.add_argument("--iterations", type=int, default=None, help="recover iterations")
    d.add_argument("--lr", type=float, default=None, help="recover learning rate")
    d.add_argument("--bn-coef", type=float, default=None, help="BN-matching coefficient alpha")
    d.add_argument("--bn-weights", default=None, help="first:M | linear:A,B | exp:G | w1,w2,...")
    d.add_argument("--jitter", type=int, default=None, help="max random roll in pixels")
    d.add_argument("--recover-crop-scale", default=None, help="LO,HI random-resized-crop area, or none")
    d.add_argument("--init", default=None, help="noise | real (start from a random real image of the class)")
    d.add_argument("--grayscale", default=None, action=argparse.BooleanOptionalAction,
                   help="optimise one channel repeated to three (for grayscale datasets such as digits)")
    d.add_argument("--bn-normalize", default=None,
                   help="none (paper: sum over BN layers) | mean (over layers) | channel (per-channel, over layers)")
    d.add_argument("--classes-per-batch", type=int, default=None, help="classes optimised together in one shard")
    d.add_argument("--student", default=None)
    d.add_argument("--student-width", type=float, default=None)
    d.add_argument("--posttrain-epochs", type=int, default=None)
    d.add_argument("--posttrain-batch-size", type=int, default=None)
    d.add_argument("--posttrain-lr", type=float, default=None)
    d.add_argument("--temperature", type=float, default=None, help="KD temperature")
    d.add_argument("--mix", default=None, help=f"one of {', '.join(MIXES)}")
    d.add_argument("--eval-every", type=int, default=None)
    d.add_argument("--num-gpus", type=int, default=0, help="one synthesis actor per GPU; 0 for CPU actors")
    d.add_argument("--num-workers", type=int, default=None, help="CPU synthesis actors (default: one per core)")
    d.add_argument("--address", default=None, help="join an existing Ray cluster (auto, host:port or ray://host:port)")
    d.add_argument("--posttrain-workers", type=int, default=None,
                   help="Ray Train workers for the post-train stage (default 1; one GPU each with --num-gpus)")
    d.add_argument("--checkpoint-every", type=int, default=None, help="post-train epochs between checkpoints")

    s = sub.add_parser("squeeze", help="train a backbone (SSL + linear probe, or supervised)")
    _add_common_data(s)
    s.add_argument("--arch", default=None)
    s.add_argument("--width", type=float, default=None)
    s.add_argument("--method", default="simclr", help=f"one of {', '.join(SQUEEZE_METHODS)}")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--from", dest="from_checkpoint", default=None,
                   help="public SSL checkpoint (torchvision, MoCo-v2/v3, DINO, SwAV): only fit the linear head")
    s.add_argument("--split", default="train", help="train, or train-noval to keep the validation split unseen")
    s.add_argument("--num-gpus", type=int, default=0)
    s.add_argument("--out", required=True, help="checkpoint path (.pt)")

    p = sub.add_parser("posttrain", help="train a student on a distilled set with the teacher's soft labels")
    p.add_argument("--distilled", required=True, help="a distill output dir, its distilled/ dir, or an images/ folder")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", default=None)
    p.add_argument("--student-width", type=float, default=None)
    p.add_argument("--dataset", default=None, help="dataset of the real test split (default: from the distill run)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", default=None, help=f"one of {', '.join(OPTIMIZERS)}")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--mix", default=None)
    p.add_argument("--eval-every", type=int, default=None, help="also evaluate every E epochs")
    p.add_argument("--checkpoint-every", type=int, default=None, help="epochs between checkpoints (default: ~20 per run)")
    p.add_argument("--amp", default=None, help="autocast on GPU: bf16 (default), fp16 or none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP); the global batch stays the same")
    p.add_argument("--num-gpus", type=int, default=0, help="> 0: one GPU per worker")
    p.add_argument("--threads-per-worker", type=int, default=1, help="CPUs (torch threads) each CPU worker reserves")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (auto, host:port or ray://host:port)")
    p.add_argument("--store-soft-labels", action="store_true",
                   help="also write the teacher's top-k probabilities on every crop to OUT/soft_labels/")
    p.add_argument("--topk", type=int, default=10, help="probabilities kept per crop with --store-soft-labels")
    p.add_argument("--soft-labels", default=None, help="train from soft labels stored by --store-soft-labels "
                                                       "(the teacher is not run)")
    p.add_argument("--out", required=True)
    t = sub.add_parser("tune", help="Ray Tune sweep of recover settings across recovery-model sizes")
    t.add_argument("--config", required=True, help="tune_configs/NAME.yaml")
    t.add_argument("--num-samples", type=int, default=None, help="samples per arch x method (default: the YAML's)")
    t.add_argument("--data-dir", default=None, help="overrides the YAML's data_dir")
    t.add_argument("--address", default=None, help="join an existing Ray cluster")
    t.add_argument("--out", required=True, help="sweep directory; rerun the same command to resume")
    ib = sub.add_parser("inspect-bn", help="how much each BN layer's running statistics vary across channels")
    ib.add_argument("--backbone", nargs="+", required=True, help="checkpoint(s), e.g. one per seed")
    ib.add_argument("--compare", nargs="+", default=None, help="a second group, e.g. supervised backbones")
    ib.add_argument("--label", default=None, help="name of the --backbone group (default: its method)")
    ib.add_argument("--compare-label", default=None, help="name of the --compare group (default: its method)")
    ib.add_argument("--json", required=True)
    ib.add_argument("--plot", default=None, help="PNG: the groups side by side, per layer")
    b = sub.add_parser("bench", help="time production code paths")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=Parser)
    sc = bsub.add_parser("scaling", help="the same synthesis job on 1, 2, ... single-thread CPU actors")
    sc.add_argument("--workers", default="1,2", help="comma-separated actor counts; the first is the baseline")
    sc.add_argument("--arch", default="resnet18")
    sc.add_argument("--width", type=float, default=0.25)
    sc.add_argument("--image-size", type=int, default=16)
    sc.add_argument("--num-classes", type=int, default=10, help="images per shard (one per class)")
    sc.add_argument("--shards", type=int, default=8)
    sc.add_argument("--iterations", type=int, default=100)
    sc.add_argument("--address", default=None)
    sc.add_argument("--json", required=True)
    rc = bsub.add_parser("recover", help="images x iterations per second of the production recover step")
    rc.add_argument("--arch", default="resnet18")
    rc.add_argument("--width", type=float, default=0.25)
    rc.add_argument("--image-size", type=int, default=32)
    rc.add_argument("--num-classes", type=int, default=100)
    rc.add_argument("--batch", type=int, default=100)
    rc.add_argument("--iterations", type=int, default=20)
    rc.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    rc.add_argument("--repeats", type=int, default=3)
    rc.add_argument("--num-gpus", type=int, default=0, help="1: time on the GPU")
    rc.add_argument("--json", required=True)
    mo = bsub.add_parser("models", help="recover throughput and student top-1 per recovery-model size")
    mo.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)}")
    mo.add_argument("--data-dir", default=None)
    mo.add_argument("--archs", default="resnet18,resnet50,resnet101", help="comma-separated recovery archs")
    mo.add_argument("--methods", default="scdd,sre2l", help="comma-separated: scdd and/or sre2l")
    mo.add_argument("--width", type=float, default=0.25)
    mo.add_argument("--ipc", type=int, default=10)
    mo.add_argument("--seed", type=int, default=0)
    mo.add_argument("--threads", type=int, default=1, help="torch threads of the in-process job")
    mo.add_argument("--image-size", type=int, default=None, help="(digits preset if omitted)")
    mo.add_argument("--iterations", type=int, default=None, help="recover iterations (preset if omitted)")
    mo.add_argument("--squeeze-epochs", type=int, default=None)
    mo.add_argument("--posttrain-epochs", type=int, default=None)
    mo.add_argument("--bn-normalize", default=None, help="none | mean | channel (preset: none, as the paper)")
    mo.add_argument("--num-gpus", type=int, default=0, help="1: recover and post-train on one GPU")
    mo.add_argument("--work", required=True, help="one distill run per cell; rerun the command to resume")
    mo.add_argument("--json", required=True)
    return ap


def _bench_models(a: argparse.Namespace) -> int:
    from .bench import bench_models
    from .store import atomic_write_json

    archs = [x.strip() for x in a.archs.split(",") if x.strip()]
    methods = [x.strip() for x in a.methods.split(",") if x.strip()]
    problem = recovery_grid_problem(archs, methods)
    if problem:
        raise ConfigError(f"--{problem[0]}", problem[1])
    for flag, v in (("--width", a.width), ("--ipc", a.ipc), ("--threads", a.threads)):
        if not v > 0:
            raise ConfigError(flag, f"must be positive (got {v!r})")
    overrides = {k: v for k, v in {"data_dir": a.data_dir, "image_size": a.image_size, "recover.iterations": a.iterations,
                                   "squeeze.epochs": a.squeeze_epochs, "posttrain.epochs": a.posttrain_epochs,
                                   "recover.bn_normalize": a.bn_normalize,
                                   "num_gpus": a.num_gpus or None}.items() if v is not None}
    # Every cell's settings are checked before the first one starts (hours of work on a CPU).
    for arch in archs:
        for method in methods:
            build_distill_config(a.dataset, os.path.join(a.work, "check"), {"arch": arch, "width": a.width,
                                                                            "method": method, "ipc": a.ipc, **overrides})
    res = bench_models(archs, methods, dataset=a.dataset, work=a.work, width=a.width, ipc=a.ipc, seed=a.seed,
                       threads=a.threads, overrides=overrides)
    atomic_write_json(a.json, res)
    print(json.dumps([{k: r[k] for k in ("arch", "method", "step_img_iters_per_s", "teacher_top1", "top1")}
                      for r in res["results"]]))
    return 0


def _bench(a: argparse.Namespace) -> int:
    from .bench import bench_recover, bench_scaling
    from .store import atomic_write_json

    if a.bench == "models":
        return _bench_models(a)
    if a.bench == "recover":
        import torch

        validate_arch(a.arch, "arch")
        for flag, v in (("--width", a.width), ("--image-size", a.image_size), ("--num-classes", a.num_classes),
                        ("--batch", a.batch), ("--iterations", a.iterations), ("--threads", a.threads),
                        ("--repeats", a.repeats)):
            if not v > 0:
                raise ConfigError(flag, f"must be positive (got {v!r})")
        if a.num_gpus > torch.cuda.device_count():
            raise ConfigError("--num-gpus", f"asked for {a.num_gpus} GPUs but {torch.cuda.device_count()} are visible")
        res = bench_recover(arch=a.arch, width=a.width, image_size=a.image_size, num_classes=a.num_classes,
                            batch=a.batch, iterations=a.iterations, threads=a.threads, repeats=a.repeats,
                            device="cuda" if a.num_gpus else "cpu")
        atomic_write_json(a.json, res)
        print(json.dumps({k: res[k] for k in ("arch", "width", "image_size", "batch", "threads", "img_iters_per_s")}))
        return 0
    try:
        workers = [int(w) for w in a.workers.split(",")]
    except ValueError:
        raise ConfigError("--workers", f"expected comma-separated integers (got {a.workers!r})") from None
    if not workers or min(workers) < 1:
        raise ConfigError("--workers", f"each count must be >= 1 (got {a.workers!r})")
    validate_arch(a.arch, "arch")
    for flag, v in (("--width", a.width), ("--image-size", a.image_size), ("--num-classes", a.num_classes),
                    ("--shards", a.shards), ("--iterations", a.iterations)):
        if not v > 0:
            raise ConfigError(flag, f"must be positive (got {v!r})")
    try:
        res = bench_scaling(workers, arch=a.arch, width=a.width, image_size=a.image_size,
                            num_classes=a.num_classes, shards=a.shards, iterations=a.iterations, address=a.address)
    except ConnectionError as e:
        raise ConfigError("--address", str(e)) from None
    atomic_write_json(a.json, res)
    print(json.dumps(res["results"]))
    return 0


def _distill(a: argparse.Namespace) -> int:
    from . import distill

    ov = {
        "data_dir": a.data_dir, "image_size": a.image_size, "arch": a.arch, "width": a.width, "ipc": a.ipc,
        "method": a.method, "seed": a.seed, "backbone": a.backbone, "teacher": a.teacher, "num_gpus": a.num_gpus,
        "num_workers": a.num_workers, "address": a.address, "posttrain_workers": a.posttrain_workers,
        "squeeze.method": a.ssl, "squeeze.epochs": a.squeeze_epochs,
        "recover.iterations": a.iterations, "recover.lr": a.lr, "recover.bn_coef": a.bn_coef,
        "recover.bn_weights": a.bn_weights, "recover.jitter": a.jitter, "recover.init": a.init,
        "recover.classes_per_batch": a.classes_per_batch, "recover.grayscale": a.grayscale,
        "recover.bn_normalize": a.bn_normalize,
        "recover.crop_scale": parse_scale(a.recover_crop_scale, "--recover-crop-scale") if a.recover_crop_scale else None,
        "posttrain.student": a.student, "posttrain.student_width": a.student_width,
        "posttrain.epochs": a.posttrain_epochs, "posttrain.batch_size": a.posttrain_batch_size,
        "posttrain.lr": a.posttrain_lr, "posttrain.temperature": a.temperature, "posttrain.mix": a.mix,
        "posttrain.eval_every": a.eval_every, "posttrain.checkpoint_every": a.checkpoint_every,
    }
    given = {k: v for k, v in ov.items() if v is not None}
    if a.recover_crop_scale is not None:  # "none" is a real value here: no random-resized-crop
        given["recover.crop_scale"] = ov["recover.crop_scale"]
    cfg = build_distill_config(a.dataset, a.out, given)
    prep = distill.prepare(cfg)
    report = distill.run(prep)
    summary = {k: report[k] for k in ("method", "dataset", "ipc", "num_images", "top1", "teacher_top1",
                                       "recover_seconds", "posttrain_seconds")}
    print(json.dumps(summary))
    return 0


def _squeeze(a: argparse.Namespace) -> int:
    import torch

    from .data import DataError, load_split
    from .evaluation import top1
    from .models import save_checkpoint
    from .squeeze import squeeze

    if a.dataset not in DATASETS:
        raise ConfigError("--dataset", f"unknown value {a.dataset!r} (choose from {', '.join(DATASETS)})")
    preset = PRESETS[a.dataset]
    arch = a.arch or preset["arch"]
    width = a.width if a.width is not None else preset["width"]
    size = a.image_size or preset["image_size"]
    validate_arch(arch, "arch")
    if not width > 0:
        raise ConfigError("--width", f"must be a positive number (got {width!r})")
    sq = {**preset.get("squeeze", {}), "method": a.method}
    if a.epochs is not None:
        sq["epochs"] = a.epochs
    cfg = SqueezeConfig(**sq)
    try:
        validate_squeeze(cfg)
    except ConfigError as e:
        if e.flag == "--ssl":
            raise ConfigError("--method", str(e).split(": ", 1)[1]) from None
        raise
    if a.split not in ("train", "train-noval"):
        raise ConfigError("--split", f"must be train or train-noval (got {a.split!r})")
    try:
        train = load_split(a.dataset, a.split, a.data_dir, size)
        test = load_split(a.dataset, "test", a.data_dir, size)
    except DataError as e:
        raise ConfigError("", str(e)) from None
    device = torch.device("cuda" if a.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    method, small, meta = a.method, size <= 64, {}
    if a.from_checkpoint:  # import + linear probe only: the SSL BN statistics stay as published
        from .distill import load_checkpoint_arg
        from .squeeze import linear_probe

        ckpt = load_checkpoint_arg(a.from_checkpoint, "--from", train.info, size, allow_probe=True)
        if a.arch and (ckpt.arch != a.arch or (a.width is not None and abs(ckpt.width - a.width) > 1e-9)):
            raise ConfigError("--arch", f"{a.from_checkpoint} is a {ckpt.arch} width {ckpt.width:g} but --arch "
                                        f"{a.arch} --width {width:g} was asked for")
        arch, width, small, method = ckpt.arch, ckpt.width, ckpt.small_input, ckpt.method
        meta = {k: ckpt.meta[k] for k in ("imported_from", "layout")}
        model = ckpt.build().to(device, memory_format=torch.channels_last)
        if ckpt.meta.get("needs_probe"):
            linear_probe(model, train, cfg, device, a.seed)
    else:
        model = squeeze(train, arch, width, cfg, device=device, seed=a.seed, small_input=small)
        meta = {"epochs": cfg.epochs}
    acc = top1(model, test, train.info.mean, train.info.std, device)
    save_checkpoint(a.out, model, arch=arch, width=width, num_classes=train.info.num_classes, image_size=size,
                    small_input=small, mean=train.info.mean, std=train.info.std, method=method,
                    meta={"dataset": a.dataset, "split": a.split, "seed": a.seed, "test_top1": acc, **meta})
    print(json.dumps({"out": a.out, "method": method, "arch": arch, "width": width, "test_top1": round(acc, 3)}))
    return 0


def _posttrain(a: argparse.Namespace) -> int:
    import torch

    from .data import DataError, load_split
    from .distill import RUN_FILE, load_checkpoint_arg
    from .engine import connect
    from .models import save_checkpoint
    from .posttrain import PosttrainJob, check_soft_labels, run_posttrain, soft_label_meta
    from .report import save_grid
    from .store import SOFT_META, StoreError, atomic_write_json, images_digest, read_distilled

    src = a.distilled
    run_file = os.path.join(src, RUN_FILE)
    dataset, data_dir, image_size = a.dataset, a.data_dir, None
    if os.path.isfile(run_file):
        with open(run_file) as f:
            prev = json.load(f)["config"]
        dataset = dataset or prev["dataset"]
        data_dir = data_dir or prev["data_dir"]
        image_size = prev["image_size"]
        src = os.path.join(src, "distilled")
    try:
        images, class_ids, _ = read_distilled(src)
    except StoreError as e:
        raise ConfigError("--distilled", str(e)) from None
    teacher_ckpt = load_checkpoint_arg(a.teacher, "--teacher")
    dataset = dataset or teacher_ckpt.meta.get("dataset")
    if dataset not in DATASETS:
        raise ConfigError("--dataset", f"cannot tell the dataset of {a.distilled}; pass --dataset")
    image_size = image_size or int(images.shape[-1])
    try:
        test = load_split(dataset, "test", data_dir, image_size)
    except DataError as e:
        raise ConfigError("--data-dir", str(e)) from None
    info = test.info
    if teacher_ckpt.num_classes != info.num_classes:
        raise ConfigError("--teacher", f"{a.teacher} has {teacher_ckpt.num_classes} classes but the distilled "
                                       f"data ({dataset}) has {info.num_classes}")
    if int(class_ids.max()) >= info.num_classes:
        raise ConfigError("--distilled", f"class id {int(class_ids.max())} is out of range for {dataset}")
    preset = PRESETS[dataset].get("posttrain", {})
    pt = {**preset}
    for key, val in (("student", a.student), ("student_width", a.student_width), ("epochs", a.epochs),
                     ("batch_size", a.batch_size), ("lr", a.lr), ("optimizer", a.optimizer),
                     ("temperature", a.temperature), ("mix", a.mix), ("eval_every", a.eval_every),
                     ("checkpoint_every", a.checkpoint_every), ("amp", a.amp)):
        if val is not None:
            pt[key] = val
    cfg = PosttrainConfig(**pt)
    validate_posttrain(cfg)
    if not (isinstance(a.num_workers, int) and a.num_workers >= 1):
        raise ConfigError("--num-workers", f"must be a positive integer (got {a.num_workers!r})")
    if a.num_gpus < 0 or a.num_gpus > 0 and not a.address and a.num_gpus > torch.cuda.device_count():
        raise ConfigError("--num-gpus", f"asked for {a.num_gpus} GPUs but {torch.cuda.device_count()} are visible")
    if a.topk < 1:
        raise ConfigError("--topk", f"must be a positive integer (got {a.topk})")
    if a.soft_labels and a.store_soft_labels:
        raise ConfigError("--soft-labels", "cannot be combined with --store-soft-labels")
    digest = images_digest(images)
    if a.soft_labels:
        check_soft_labels(a.soft_labels, cfg, digest, info.num_classes, len(images))
    job = PosttrainJob(source=src, images_digest=digest, num_images=len(images), teacher=teacher_ckpt, test=test,
                       info=info, cfg=cfg, image_size=image_size, small_input=image_size <= 64, seed=a.seed,
                       soft_labels=a.soft_labels, topk=a.topk,
                       store_soft_labels=os.path.join(a.out, "soft_labels") if a.store_soft_labels else None)
    fp = job.fingerprint()
    run_path = os.path.join(a.out, "posttrain-run.json")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ConfigError("--out", f"{a.out} exists and is not a directory")
    if os.path.isdir(a.out) and os.listdir(a.out):
        try:
            with open(run_path) as f:
                same = json.load(f).get("fingerprint") == fp
        except (OSError, ValueError):
            raise ConfigError("--out", f"{a.out} is not empty and holds no posttrain run; choose a new directory") from None
        if not same:
            raise ConfigError("--out", f"{a.out} holds a post-train with other settings; choose a new directory")
    try:
        connect(a.address)
    except ConnectionError as e:
        raise ConfigError("--address", str(e)) from None
    from .posttrain import check_workers

    use_gpu = a.num_gpus > 0
    if a.threads_per_worker < 1:
        raise ConfigError("--threads-per-worker", f"must be a positive integer (got {a.threads_per_worker})")
    check_workers(job, a.num_workers, use_gpu, a.threads_per_worker)  # before anything is written
    os.makedirs(a.out, exist_ok=True)
    atomic_write_json(run_path, {"fingerprint": fp, "config": dataclasses.asdict(cfg), "distilled": a.distilled,
                                 "teacher": a.teacher, "seed": a.seed})
    if job.store_soft_labels:
        atomic_write_json(os.path.join(job.store_soft_labels, SOFT_META), soft_label_meta(job, complete=False))
    res = run_posttrain(job, storage_path=os.path.join(a.out, "train"), name=f"student-{fp}",
                        num_workers=a.num_workers, use_gpu=use_gpu, threads=a.threads_per_worker)
    if job.store_soft_labels:
        atomic_write_json(os.path.join(job.store_soft_labels, SOFT_META), soft_label_meta(job, complete=True))
    from .models import create_model

    student = create_model(cfg.student, info.num_classes, cfg.student_width, image_size <= 64)
    student.load_state_dict(res.student_state)
    save_checkpoint(os.path.join(a.out, "student.pt"), student, arch=cfg.student, width=cfg.student_width,
                    num_classes=info.num_classes, image_size=image_size, small_input=image_size <= 64,
                    mean=info.mean, std=info.std, method="student", meta={"dataset": dataset})
    save_grid(os.path.join(a.out, "grid.png"), images, class_ids, info.class_names)
    result = {"distilled": a.distilled, "teacher": a.teacher, "dataset": dataset, "num_images": int(len(images)),
              "top1": round(res.top1, 3), "posttrain_seconds": round(res.seconds, 2),
              "startup_seconds": None if res.startup_seconds is None else round(res.startup_seconds, 2),
              "num_workers": a.num_workers, "epochs": res.epochs, "steps": res.steps,
              "trained_epochs": res.trained_epochs, "seed": a.seed, "soft_labels": a.soft_labels,
              "stored_soft_labels": job.store_soft_labels, "history": res.history, "config": dataclasses.asdict(cfg)}
    atomic_write_json(os.path.join(a.out, "posttrain.json"), result)
    print(json.dumps({k: result[k] for k in ("dataset", "num_images", "num_workers", "top1", "posttrain_seconds")}))
    return 0



def _tune(a: argparse.Namespace) -> int:
    from .tune_config import read_tune_config

    cfg = read_tune_config(a.config)
    if a.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=a.data_dir)
    if a.num_samples is not None and a.num_samples < 1:
        raise ConfigError("--num-samples", f"must be a positive integer (got {a.num_samples})")
    from .data import DataError, load_split

    try:  # the dataset must be there before Ray starts or anything is written (val: the sweep's objective)
        load_split(cfg.dataset, "val", cfg.data_dir, cfg.image_size)
    except DataError as e:
        raise ConfigError("data_dir", str(e)) from None
    done = os.path.join(a.out, "best.json")
    ours = {"backbones", "tune", "best.json", "summary.md"}  # what a sweep (maybe interrupted) leaves
    if os.path.isdir(a.out) and set(os.listdir(a.out)) - ours:
        raise ConfigError("--out", f"{a.out} holds files that are not a sweep's; choose a new directory")
    from .tune import run_sweep

    try:
        res = run_sweep(cfg, a.out, num_samples=a.num_samples, address=a.address)
    except ConnectionError as e:
        raise ConfigError("--address", str(e)) from None
    print(json.dumps({k: {"val_top1": v["val_top1"], "test_top1": v["test_top1"], **v["config"]}
                      for k, v in res["best"].items()}))
    print(f"wrote {done} and {os.path.join(a.out, 'summary.md')}", file=sys.stderr)
    return 0


def _bn_model(path: str, flag: str):
    """(model, method) of our checkpoint or a public one; BN statistics need no head."""
    from .models import CheckpointError, NotOurCheckpoint, import_backbone, load_checkpoint, model_from_import

    try:
        ckpt = load_checkpoint(path)
        return ckpt.build(), ckpt.method
    except NotOurCheckpoint:
        pass
    except CheckpointError as e:
        raise ConfigError(flag, str(e)) from None
    try:
        imp = import_backbone(path)
        return model_from_import(imp, 1 if imp.head is None else len(imp.head["bias"]))[0], imp.layout
    except CheckpointError as e:
        raise ConfigError(flag, str(e)) from None


def _inspect_bn(a: argparse.Namespace) -> int:
    import statistics

    from .bn import bn_statistics, summarize_bn
    from .report import plot_bn
    from .store import atomic_write_json

    for flag, p in (("--json", a.json), ("--plot", a.plot)):
        if p and os.path.isdir(p):
            raise ConfigError(flag, f"{p} is a directory; give a file path")
    groups = []
    for flag, paths, label in (("--backbone", a.backbone, a.label), ("--compare", a.compare, a.compare_label)):
        if not paths:
            continue
        runs, methods = [], []
        for p in paths:
            model, method = _bn_model(p, flag)
            rows = bn_statistics(model)
            if runs and len(rows) != len(runs[0]["layers"]):
                raise ConfigError(flag, f"{p} has {len(rows)} BN layers, {paths[0]} has {len(runs[0]['layers'])}; "
                                        "a group must share one architecture")
            runs.append({"path": p, "method": method, "layers": rows, "summary": summarize_bn(rows)})
            methods.append(method)
        keys = [k for k in runs[0]["summary"] if k != "layers"]
        agg = {}
        for k in keys:
            vals = [r["summary"][k] for r in runs if r["summary"][k] is not None]
            agg[k] = {"mean": statistics.fmean(vals) if vals else None,
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        groups.append({"label": label or "/".join(sorted(set(methods))), "flag": flag, "checkpoints": runs,
                       "summary": agg})
    if len(groups) == 2 and len(groups[0]["checkpoints"][0]["layers"]) != len(groups[1]["checkpoints"][0]["layers"]):
        raise ConfigError("--compare", "the compared backbones have a different number of BN layers than --backbone")
    atomic_write_json(a.json, {"groups": groups})
    if a.plot:
        plot_bn(a.plot, [{"label": g["label"], "runs": [r["layers"] for r in g["checkpoints"]]} for g in groups])
    for g in groups:
        s = g["summary"]
        print(json.dumps({"label": g["label"], "n": len(g["checkpoints"]),
                          **{k: (f"{v['mean']:.4g} +- {v['std']:.2g}" if v["mean"] is not None else None)
                             for k, v in s.items()}}))
    return 0


COMMANDS = {"distill": _distill, "squeeze": _squeeze, "posttrain": _posttrain, "bench": _bench,
            "inspect-bn": _inspect_bn, "tune": _tune}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"scdd-ray: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from .data import DataError
    from .engine import EngineError
    from .models import CheckpointError
    from .store import StoreError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, CheckpointError, StoreError, EngineError) as e:
        print(f"scdd-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scdd-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
