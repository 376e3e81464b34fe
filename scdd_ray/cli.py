"""`scdd-ray` command line: parse flags into configs, run, and name flags in errors.

The only module that knows flag names. Each command maps the configuration
fields it sets to the argparse destinations that hold them (`fields`); the
same table builds the configs and turns an error about a field into
`scdd-ray: error: --flag: ...` (exit 2), so the two cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from . import data
from .bench import bench_models, bench_recover, bench_scaling
from .config import (METHODS, OPTIMIZERS, build_distill_config, parse_scale, squeeze_methods, validate_arch,
                     validate_recovery_grid)
from .core.relabel import MIX_CODES
from .dist.cluster import JOIN_TIMEOUT_S, handle_sigterm, reset_sigterm, shutdown, sigterm_received
from .dist.tune import run_sweep
from .errors import ConfigError, ScddError, Terminated
from .models import ARCHS
from .pipeline import distill
from .pipeline.inspect import inspect_bn
from .pipeline.outdir import check_only_holds
from .pipeline.posttrain import PosttrainRequest, prepare_posttrain
from .pipeline.posttrain import run as run_posttrain_command
from .pipeline.squeeze import run_squeeze
from .ranking import METHODS as RANKED_METHODS
from .ranking import HLR_REFERENCES, TableSpec, cells, markdown, run_table, write_table
from .store import atomic_write_json
from .tune_config import read_tune_config

log = logging.getLogger("scdd_ray")
# The environment, not the program, is at fault: one line naming the path, not a traceback.
ANTICIPATED_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                         errno.EROFS}


ADDRESS_HELP = (f"join an existing Ray cluster: auto, or its GCS address host:port (gives up after "
                f"{JOIN_TIMEOUT_S:g} s if no Ray cluster answers there), or ray://host:port (needs ray[client])")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    """A subcommand: its flags, what it runs, and which config field each flag sets."""

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    fields: dict[str, str]  # configuration field -> argparse dest


def _same(*dests: str) -> dict[str, str]:
    return {d: d for d in dests}


def _positive(a: argparse.Namespace, *dests: str) -> None:
    for d in dests:
        v = getattr(a, d)
        if not v > 0:
            raise ConfigError(d, f"must be positive (got {v!r})")


def _common_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(data.names())}")
    p.add_argument("--data-dir", default=None,
                   help="local dataset directory (Hugging Face Parquet, CIFAR python layout, or ImageFolder)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (preset if omitted)")
    p.add_argument("--image-column", default=None, help="Parquet datasets: the image column (default: img or image)")
    p.add_argument("--label-column", default=None,
                   help="Parquet datasets: the label column (default: label, labels or fine_label)")
    p.add_argument("--seed", type=int, default=0)


# --- distill -------------------------------------------------------------------------

DISTILL_FIELDS = {
    **_same("dataset", "out", "data_dir", "image_size", "arch", "width", "ipc", "method", "seed", "backbone",
            "teacher", "num_gpus", "num_workers", "address", "posttrain_workers", "image_column", "label_column",
            "holdout"),
    "squeeze.method": "ssl", "squeeze.epochs": "squeeze_epochs",
    **{f"recover.{d}": d for d in ("iterations", "lr", "bn_coef", "bn_weights", "jitter", "init",
                                   "classes_per_batch", "grayscale", "bn_normalize", "augment_per", "ipc_per_shard",
                                   "compile")},
    "recover.crop_scale": "recover_crop_scale", "recover.flip": "recover_flip",
    **{f"posttrain.{d}": d for d in ("student", "student_width", "temperature", "mix", "eval_every",
                                     "checkpoint_every")},
    "posttrain.epochs": "posttrain_epochs", "posttrain.batch_size": "posttrain_batch_size",
    "posttrain.lr": "posttrain_lr", "posttrain.batch_per_worker": "posttrain_batch_per_worker",
}


def _distill_args(d: argparse.ArgumentParser) -> None:
    _common_data(d)
    d.add_argument("--out", required=True)
    d.add_argument("--arch", default=None, help=f"recovery backbone: {', '.join(ARCHS)} or timm:<name>")
    d.add_argument("--width", type=float, default=None, help="channel width multiplier (1.0 = paper's model)")
    d.add_argument("--ipc", type=int, default=None, help="images per class")
    d.add_argument("--method", default="scdd", help=f"one of {', '.join(METHODS)}")
    d.add_argument("--backbone", default=None, help="checkpoint to recover from (default: squeeze one, cached)")
    d.add_argument("--teacher", default=None,
                   help="checkpoint that relabels crops (default: a supervised model of --arch, the same for "
                        "every method; 'backbone': the recovery backbone)")
    d.add_argument("--holdout", action="store_true", default=None,
                   help="choose settings without the test split: train on train less its validation share, report "
                        "top-1 on that share (the test split is never read)")
    d.add_argument("--ssl", default=None, help=f"SSL objective for scdd backbones: {', '.join(squeeze_methods()[:-1])}")
    d.add_argument("--squeeze-epochs", type=int, default=None)
    d.add_argument("--iterations", type=int, default=None, help="recover iterations")
    d.add_argument("--lr", type=float, default=None, help="recover learning rate")
    d.add_argument("--bn-coef", type=float, default=None, help="BN-matching coefficient alpha")
    d.add_argument("--bn-weights", default=None, help="first:M | linear:A,B | exp:G | w1,w2,...")
    d.add_argument("--jitter", type=int, default=None, help="max random roll in pixels")
    d.add_argument("--recover-crop-scale", default=None, help="LO,HI random-resized-crop area, or none")
    d.add_argument("--recover-flip", default=None, action=argparse.BooleanOptionalAction,
                   help="random horizontal flips in recover (with --augment-per, per image or per batch)")
    d.add_argument("--init", default=None, help="noise | real (start from a random real image of the class)")
    d.add_argument("--grayscale", default=None, action=argparse.BooleanOptionalAction,
                   help="optimise one channel repeated to three (for grayscale datasets such as digits)")
    d.add_argument("--bn-normalize", default=None,
                   help="none (paper: sum over BN layers) | mean (over layers) | channel (per-channel, over layers)")
    d.add_argument("--classes-per-batch", type=int, default=None, help="classes optimised together in one shard")
    d.add_argument("--ipc-per-shard", type=int, default=None,
                   help="consecutive IPC indices optimised together in one shard (a bigger batch; default 1)")
    d.add_argument("--augment-per", default=None,
                   help="image (default): a crop box and flip per image | batch: one for the whole batch (authors')")
    d.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the recover step (off by default; see benchmarks/RESULTS.md)")
    d.add_argument("--student", default=None)
    d.add_argument("--student-width", type=float, default=None)
    d.add_argument("--posttrain-epochs", type=int, default=None)
    d.add_argument("--posttrain-batch-size", type=int, default=None)
    d.add_argument("--posttrain-lr", type=float, default=None)
    d.add_argument("--posttrain-batch-per-worker", default=None, action=argparse.BooleanOptionalAction,
                   help="--posttrain-batch-size images per post-train worker (lr scaled), not per step")
    d.add_argument("--temperature", type=float, default=None, help="KD temperature")
    d.add_argument("--mix", default=None, help=f"one of {', '.join(MIX_CODES)}")
    d.add_argument("--eval-every", type=int, default=None)
    d.add_argument("--num-gpus", type=int, default=0, help="one synthesis actor per GPU; 0 for CPU actors")
    d.add_argument("--num-workers", type=int, default=None, help="CPU synthesis actors (default: one per core)")
    d.add_argument("--address", default=None, help=ADDRESS_HELP)
    d.add_argument("--posttrain-workers", type=int, default=None,
                   help="Ray Train workers for the post-train stage (default 1; one GPU each with --num-gpus)")
    d.add_argument("--checkpoint-every", type=int, default=None, help="post-train epochs between checkpoints")


def _distill(a: argparse.Namespace) -> int:
    given = {f: getattr(a, d) for f, d in DISTILL_FIELDS.items() if f not in ("dataset", "out")}
    given = {f: v for f, v in given.items() if v is not None}
    if a.recover_crop_scale is not None:  # "none" is a real value here: no random-resized-crop
        given["recover.crop_scale"] = parse_scale(a.recover_crop_scale, "recover.crop_scale")
    cfg = build_distill_config(a.dataset, a.out, given)
    report = distill.run(distill.prepare(cfg))
    print(json.dumps({k: report[k] for k in ("method", "dataset", "ipc", "num_images", "top1", "teacher_top1",
                                             "recover_seconds", "posttrain_seconds")}))
    return 0


# --- squeeze -------------------------------------------------------------------------

SQUEEZE_FIELDS = {**_same("dataset", "data_dir", "image_size", "seed", "arch", "width", "epochs", "from_checkpoint",
                          "split", "num_gpus", "out", "image_column", "label_column"),
                  "squeeze.method": "method", "squeeze.epochs": "epochs"}


def _squeeze_args(s: argparse.ArgumentParser) -> None:
    _common_data(s)
    s.add_argument("--arch", default=None)
    s.add_argument("--width", type=float, default=None)
    s.add_argument("--method", default="simclr", help=f"one of {', '.join(squeeze_methods())}")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--from", dest="from_checkpoint", default=None,
                   help="public SSL checkpoint (torchvision, MoCo-v2/v3, DINO, SwAV): only fit the linear head")
    s.add_argument("--split", default="train", help="train, or train-noval to keep the validation split unseen")
    s.add_argument("--num-gpus", type=int, default=0)
    s.add_argument("--out", required=True, help="checkpoint path (.pt)")


def _squeeze(a: argparse.Namespace) -> int:
    overrides = {"arch": a.arch, "width": a.width, "image_size": a.image_size, "epochs": a.epochs}
    res = run_squeeze(a.dataset, a.method, a.out, overrides=overrides, data_dir=a.data_dir, split=a.split,
                      seed=a.seed, from_checkpoint=a.from_checkpoint, use_gpu=a.num_gpus > 0,
                      data_options={"image_column": a.image_column, "label_column": a.label_column})
    print(json.dumps(res))
    return 0


# --- posttrain -----------------------------------------------------------------------

POSTTRAIN_FIELDS = {
    **_same("distilled", "teacher", "out", "dataset", "data_dir", "seed", "num_workers", "num_gpus",
            "threads_per_worker", "address", "store_soft_labels", "topk", "soft_labels"),
    **{f"posttrain.{d}": d for d in ("student", "student_width", "epochs", "batch_size", "lr", "optimizer",
                                     "temperature", "mix", "eval_every", "checkpoint_every", "amp", "labels", "crop",
                                     "batch_per_worker")},
}


def _posttrain_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--crop", default=None, help="resized (random-resized-crop) | padded (RandomCrop with 4 px padding)")
    p.add_argument("--eval-every", type=int, default=None, help="also evaluate every E epochs")
    p.add_argument("--checkpoint-every", type=int, default=None, help="epochs between checkpoints (default: ~20 per run)")
    p.add_argument("--amp", default=None, help="autocast on GPU: bf16 (default), fp16 or none")
    p.add_argument("--labels", default=None,
                   help="soft (default): the teacher's on every crop; hard: the images' classes by cross entropy, "
                        "no teacher (DD-Ranking's hard-label protocol)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (DDP); the global batch stays the same unless --batch-per-worker")
    p.add_argument("--batch-per-worker", default=None, action=argparse.BooleanOptionalAction,
                   help="--batch-size images per worker (global batch x workers, lr scaled: README)")
    p.add_argument("--num-gpus", type=int, default=0, help="> 0: one GPU per worker")
    p.add_argument("--threads-per-worker", type=int, default=1, help="CPUs (torch threads) each CPU worker reserves")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--store-soft-labels", action="store_true",
                   help="also write the teacher's top-k probabilities on every crop to OUT/soft_labels/")
    p.add_argument("--topk", type=int, default=10, help="probabilities kept per crop with --store-soft-labels")
    p.add_argument("--soft-labels", default=None, help="train from soft labels stored by --store-soft-labels "
                                                       "(the teacher is not run)")
    p.add_argument("--out", required=True)


def _posttrain(a: argparse.Namespace) -> int:
    overrides = {f.split(".", 1)[1]: getattr(a, d) for f, d in POSTTRAIN_FIELDS.items() if f.startswith("posttrain.")}
    req = PosttrainRequest(distilled=a.distilled, teacher=a.teacher, out=a.out, dataset=a.dataset,
                           data_dir=a.data_dir, overrides=overrides, seed=a.seed, num_workers=a.num_workers,
                           num_gpus=a.num_gpus, threads_per_worker=a.threads_per_worker, address=a.address,
                           store_soft_labels=a.store_soft_labels, topk=a.topk, soft_labels=a.soft_labels)
    result = run_posttrain_command(req, *prepare_posttrain(req))
    print(json.dumps({k: result[k] for k in ("dataset", "num_images", "num_workers", "top1", "posttrain_seconds")}))
    return 0


# --- tune, inspect-bn ----------------------------------------------------------------

TUNE_FIELDS = _same("config", "num_samples", "data_dir", "address", "out")


def _tune_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", required=True, help="tune_configs/NAME.yaml")
    t.add_argument("--num-samples", type=int, default=None, help="samples per arch x method (default: the YAML's)")
    t.add_argument("--data-dir", default=None, help="overrides the YAML's data_dir")
    t.add_argument("--address", default=None, help=ADDRESS_HELP)
    t.add_argument("--out", required=True, help="sweep directory; rerun the same command to resume")


def _tune(a: argparse.Namespace) -> int:
    cfg = read_tune_config(a.config)
    if a.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=a.data_dir)
    if a.num_samples is not None and a.num_samples < 1:
        raise ConfigError("num_samples", f"must be a positive integer (got {a.num_samples})")
    # the dataset must be there before Ray starts or anything is written (val: the sweep's objective)
    data.load_split(cfg.dataset, "val", cfg.data_dir, cfg.image_size)
    check_only_holds(a.out, {"backbones", "tune", "best.json", "summary.md"}, "sweep")
    try:
        res = run_sweep(cfg, a.out, num_samples=a.num_samples, address=a.address)
    except ConnectionError as e:
        raise ConfigError("address", str(e)) from None
    print(json.dumps({k: {"val_top1": v["val_top1"], "test_top1": v["test_top1"], **v["config"]}
                      for k, v in res["best"].items()}))
    print(f"wrote {os.path.join(a.out, 'best.json')} and {os.path.join(a.out, 'summary.md')}", file=sys.stderr)
    return 0


INSPECT_FIELDS = _same("backbone", "compare", "label", "compare_label", "json", "plot")


def _inspect_args(ib: argparse.ArgumentParser) -> None:
    ib.add_argument("--backbone", nargs="+", required=True, help="checkpoint(s), e.g. one per seed")
    ib.add_argument("--compare", nargs="+", default=None, help="a second group, e.g. supervised backbones")
    ib.add_argument("--label", default=None, help="name of the --backbone group (default: its method)")
    ib.add_argument("--compare-label", default=None, help="name of the --compare group (default: its method)")
    ib.add_argument("--json", required=True)
    ib.add_argument("--plot", default=None, help="PNG: the groups side by side, per layer")


def _inspect_bn(a: argparse.Namespace) -> int:
    for field, p in (("json", a.json), ("plot", a.plot)):
        if p and os.path.isdir(p):
            raise ConfigError(field, f"{p} is a directory; give a file path")
    groups = inspect_bn([("backbone", a.backbone, a.label), ("compare", a.compare, a.compare_label)], a.json, a.plot)
    for g in groups:
        s = g["summary"]
        print(json.dumps({"label": g["label"], "n": len(g["checkpoints"]),
                          **{k: (f"{v['mean']:.4g} +- {v['std']:.2g}" if v["mean"] is not None else None)
                             for k, v in s.items()}}))
    return 0


# --- bench ---------------------------------------------------------------------------

SCALING_FIELDS = _same("workers", "arch", "width", "image_size", "num_classes", "shards", "iterations", "address",
                       "json")


def _scaling_args(sc: argparse.ArgumentParser) -> None:
    sc.add_argument("--workers", default="1,2", help="comma-separated actor counts; the first is the baseline")
    sc.add_argument("--arch", default="resnet18")
    sc.add_argument("--width", type=float, default=0.25)
    sc.add_argument("--image-size", type=int, default=16)
    sc.add_argument("--num-classes", type=int, default=10, help="images per shard (one per class)")
    sc.add_argument("--shards", type=int, default=8)
    sc.add_argument("--iterations", type=int, default=100)
    sc.add_argument("--address", default=None)
    sc.add_argument("--json", required=True)


def _bench_scaling(a: argparse.Namespace) -> int:
    try:
        workers = [int(w) for w in a.workers.split(",")]
    except ValueError:
        raise ConfigError("workers", f"expected comma-separated integers (got {a.workers!r})") from None
    if not workers or min(workers) < 1:
        raise ConfigError("workers", f"each count must be >= 1 (got {a.workers!r})")
    validate_arch(a.arch, "arch")
    _positive(a, "width", "image_size", "num_classes", "shards", "iterations")
    try:
        res = bench_scaling(workers, arch=a.arch, width=a.width, image_size=a.image_size,
                            num_classes=a.num_classes, shards=a.shards, iterations=a.iterations, address=a.address)
    except ConnectionError as e:
        raise ConfigError("address", str(e)) from None
    atomic_write_json(a.json, res)
    print(json.dumps(res["results"]))
    return 0


RECOVER_FIELDS = _same("arch", "width", "image_size", "num_classes", "batch", "iterations", "threads", "repeats",
                       "num_gpus", "compile", "json")


def _recover_args(rc: argparse.ArgumentParser) -> None:
    rc.add_argument("--arch", default="resnet18")
    rc.add_argument("--width", type=float, default=0.25)
    rc.add_argument("--image-size", type=int, default=32)
    rc.add_argument("--num-classes", type=int, default=100)
    rc.add_argument("--batch", type=int, default=100)
    rc.add_argument("--iterations", type=int, default=20)
    rc.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    rc.add_argument("--repeats", type=int, default=3)
    rc.add_argument("--num-gpus", type=int, default=0, help="1: time on the GPU")
    rc.add_argument("--compile", action="store_true", help="torch.compile the step (compilation is in the warm-up)")
    rc.add_argument("--json", required=True)


def _bench_recover(a: argparse.Namespace) -> int:
    validate_arch(a.arch, "arch")
    _positive(a, "width", "image_size", "num_classes", "batch", "iterations", "threads", "repeats")
    if a.num_gpus > torch.cuda.device_count():
        raise ConfigError("num_gpus", f"asked for {a.num_gpus} GPUs but {torch.cuda.device_count()} are visible")
    res = bench_recover(arch=a.arch, width=a.width, image_size=a.image_size, num_classes=a.num_classes,
                        batch=a.batch, iterations=a.iterations, threads=a.threads, repeats=a.repeats,
                        device="cuda" if a.num_gpus else "cpu", compile=a.compile)
    atomic_write_json(a.json, res)
    print(json.dumps({k: res[k] for k in ("arch", "width", "image_size", "batch", "threads", "img_iters_per_s")}))
    return 0


MODELS_FIELDS = {**_same("dataset", "data_dir", "archs", "methods", "width", "ipc", "seed", "threads", "image_size",
                         "num_gpus", "work", "json"),
                 "recover.iterations": "iterations", "squeeze.epochs": "squeeze_epochs",
                 "posttrain.epochs": "posttrain_epochs", "recover.bn_normalize": "bn_normalize"}


def _models_args(mo: argparse.ArgumentParser) -> None:
    mo.add_argument("--dataset", default="digits", help=f"one of {', '.join(data.names())}")
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


def _bench_models(a: argparse.Namespace) -> int:
    archs = [x.strip() for x in a.archs.split(",") if x.strip()]
    methods = [x.strip() for x in a.methods.split(",") if x.strip()]
    validate_recovery_grid(archs, methods)
    _positive(a, "width", "ipc", "threads")
    cell_fields = ("data_dir", "image_size", "recover.iterations", "squeeze.epochs", "posttrain.epochs",
                   "recover.bn_normalize")
    overrides = {f: getattr(a, MODELS_FIELDS[f]) for f in cell_fields if getattr(a, MODELS_FIELDS[f]) is not None}
    if a.num_gpus:
        overrides["num_gpus"] = a.num_gpus
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


TABLE_FIELDS = {**_same("dataset", "data_dir", "methods", "ipcs", "seeds", "work", "json", "md", "part",
                        "full_epochs", "hlr", "hlr_reference", "model_seed", "width", "image_size", "num_gpus",
                        "holdout"),
                "recover.augment_per": "augment_per", "recover.ipc_per_shard": "ipc_per_shard",
                "recover.crop_scale": "recover_crop_scale", "recover.flip": "recover_flip",
                "recover.iterations": "iterations", "recover.bn_coef": "bn_coef", "recover.bn_weights": "bn_weights",
                "recover.bn_normalize": "bn_normalize", "recover.init": "init", "squeeze.epochs": "squeeze_epochs",
                "posttrain.epochs": "posttrain_epochs"}
TABLE_OVERRIDES = ("data_dir", "width", "image_size", "num_gpus", "holdout", "recover.augment_per",
                   "recover.crop_scale", "recover.flip",
                   "recover.ipc_per_shard", "recover.iterations", "recover.bn_coef",
                   "recover.bn_weights", "recover.bn_normalize", "recover.init", "squeeze.epochs", "posttrain.epochs")


def _table_args(tb: argparse.ArgumentParser) -> None:
    tb.add_argument("--dataset", default="digits", help=f"one of {', '.join(data.names())}")
    tb.add_argument("--data-dir", default=None)
    tb.add_argument("--methods", default=",".join(RANKED_METHODS), help="comma-separated, random first")
    tb.add_argument("--ipcs", default="1,10", help="comma-separated images per class")
    tb.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (mean and std over them)")
    tb.add_argument("--width", type=float, default=None)
    tb.add_argument("--image-size", type=int, default=None)
    tb.add_argument("--iterations", type=int, default=None, help="recover iterations")
    tb.add_argument("--bn-coef", type=float, default=None)
    tb.add_argument("--bn-weights", default=None)
    tb.add_argument("--bn-normalize", default=None)
    tb.add_argument("--init", default=None, help="noise | real")
    tb.add_argument("--augment-per", default=None, help="image | batch: a recover crop box per image or per batch")
    tb.add_argument("--ipc-per-shard", type=int, default=None, help="IPC indices optimised together in one shard")
    tb.add_argument("--recover-crop-scale", default=None, help="LO,HI random-resized-crop area in recover, or none")
    tb.add_argument("--recover-flip", default=None, action=argparse.BooleanOptionalAction,
                    help="random horizontal flips in recover")
    tb.add_argument("--holdout", action="store_true", default=None,
                    help="choose settings without the test split: train on train less its validation share, report "
                         "top-1 on that share (the test split is never read)")
    tb.add_argument("--squeeze-epochs", type=int, default=None)
    tb.add_argument("--posttrain-epochs", type=int, default=None)
    tb.add_argument("--full-epochs", type=int, default=30,
                    help="epochs of the hard-label student on the whole training split (for HLR)")
    tb.add_argument("--model-seed", type=int, default=None,
                    help="squeeze the teacher and backbones once with this seed and share them across --seeds "
                         "(default: one set per seed)")
    tb.add_argument("--hlr-reference", default="student",
                    help="HLR's whole-data hard-label model: student (trained for --full-epochs with the cells' "
                         "post-train settings) | teacher (the seed's supervised teacher, already trained on the "
                         "whole training split with hard labels)")
    tb.add_argument("--no-hlr", dest="hlr", action="store_false", help="skip the hard-label students (no HLR)")
    tb.add_argument("--num-gpus", type=int, default=0)
    tb.add_argument("--part", default="1/1",
                    help="i/n: run every n-th cell, starting at the i-th (parallel processes; on one CPU "
                         "machine give each OMP_NUM_THREADS=cores/n)")
    tb.add_argument("--work", required=True, help="one distill run per cell; rerun the command to resume")
    tb.add_argument("--json", required=True)
    tb.add_argument("--md", default=None, help="also write the table as Markdown")


def _ints(a: argparse.Namespace, dest: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in getattr(a, dest).split(","))
    except ValueError:
        raise ConfigError(dest, f"expected comma-separated integers (got {getattr(a, dest)!r})") from None
    if not vals or min(vals) < 0 or (dest == "ipcs" and min(vals) < 1):
        raise ConfigError(dest, f"expected {'positive' if dest == 'ipcs' else 'non-negative'} integers "
                                f"(got {getattr(a, dest)!r})")
    return vals


def _bench_table(a: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    if not methods or any(m not in RANKED_METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ConfigError("methods", f"must name some of {', '.join(RANKED_METHODS)}, once each (got {a.methods!r})")
    try:
        i, n = (int(v) for v in a.part.split("/"))
    except ValueError:
        i, n = 0, 0
    if not 1 <= i <= n:
        raise ConfigError("part", f"expected i/n with 1 <= i <= n (got {a.part!r})")
    _positive(a, "full_epochs")
    if a.model_seed is not None and a.model_seed < 0:
        raise ConfigError("model_seed", f"must be a non-negative integer (got {a.model_seed})")
    if a.hlr_reference not in HLR_REFERENCES:
        raise ConfigError("hlr_reference", f"must be one of {', '.join(HLR_REFERENCES)} (got {a.hlr_reference!r})")
    overrides = {f: getattr(a, TABLE_FIELDS[f]) for f in TABLE_OVERRIDES if getattr(a, TABLE_FIELDS[f]) is not None}
    if "recover.crop_scale" in overrides:
        overrides["recover.crop_scale"] = parse_scale(a.recover_crop_scale, "recover.crop_scale")
    if not a.num_gpus:
        overrides.pop("num_gpus")
    spec = TableSpec(a.dataset, a.work, methods, _ints(a, "ipcs"), _ints(a, "seeds"), overrides, a.full_epochs, a.hlr,
                     a.hlr_reference, a.model_seed)
    for method, ipc, seed in cells(spec):  # every cell's settings, before hours of work start
        spec.config(method, ipc, seed, os.path.join(a.work, "check"))
    table = run_table(spec, (i, n))
    if table is None:
        print(json.dumps({"part": a.part, "complete": False}))
        return 0
    write_table(table, a.json, a.md)
    print(markdown(table), end="")
    return 0


COMMANDS = {c.name: c for c in (
    Command("distill", "squeeze, recover, relabel and post-train; writes OUT/report.json", _distill_args, _distill,
            DISTILL_FIELDS),
    Command("squeeze", "train a backbone (SSL + linear probe, or supervised)", _squeeze_args, _squeeze,
            SQUEEZE_FIELDS),
    Command("posttrain", "train a student on a distilled set with the teacher's soft labels", _posttrain_args,
            _posttrain, POSTTRAIN_FIELDS),
    Command("tune", "Ray Tune sweep of recover settings across recovery-model sizes", _tune_args, _tune, TUNE_FIELDS),
    Command("inspect-bn", "how much each BN layer's running statistics vary across channels", _inspect_args,
            _inspect_bn, INSPECT_FIELDS),
    Command("bench scaling", "the same synthesis job on 1, 2, ... single-thread CPU actors", _scaling_args,
            _bench_scaling, SCALING_FIELDS),
    Command("bench recover", "images x iterations per second of the production recover step", _recover_args,
            _bench_recover, RECOVER_FIELDS),
    Command("bench models", "recover throughput and student top-1 per recovery-model size", _models_args,
            _bench_models, MODELS_FIELDS),
    Command("bench table", "random vs sre2l vs scdd over IPCs and seeds under one teacher, with IOR and HLR",
            _table_args, _bench_table, TABLE_FIELDS),
)}


def build_parser() -> tuple[Parser, dict[str, argparse.ArgumentParser]]:
    """The parser, and the subparser of each command (by its COMMANDS name)."""
    ap = Parser(prog="scdd-ray", description="SC-DD dataset distillation, from a laptop CPU to a Ray cluster.")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    parsers: dict[str, argparse.ArgumentParser] = {}
    bench = None
    for name, cmd in COMMANDS.items():
        if name.startswith("bench "):
            if bench is None:
                bench = sub.add_parser("bench", help="time production code paths").add_subparsers(
                    dest="bench", required=True, parser_class=Parser)
            p = bench.add_parser(name.split(" ", 1)[1], help=cmd.help)
        else:
            p = sub.add_parser(name, help=cmd.help)
        cmd.add_args(p)
        parsers[name] = p
    return ap, parsers


def flag_namer(parser: argparse.ArgumentParser, fields: dict[str, str]) -> Callable[[str], str | None]:
    """field -> the flag that sets it in this command (None: no flag sets it)."""
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    return lambda field: flags.get(fields.get(field, ""))


def main(argv: list[str] | None = None) -> int:
    parser, parsers = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"scdd-ray: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    name = f"bench {args.bench}" if args.command == "bench" else args.command
    cmd = COMMANDS[name]
    previous = signal.getsignal(signal.SIGTERM)
    reset_sigterm()
    handle_sigterm()  # SIGTERM (a scheduler's stop) is handled as Ctrl-C, through Ray's own handlers too
    try:
        return cmd.run(args)
    except ScddError as e:
        print(f"scdd-ray: error: {e.render(flag_namer(parsers[name], cmd.fields))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # ray.get turns a Terminated into a plain KeyboardInterrupt
        if isinstance(e, Terminated) or sigterm_received():
            shutdown()  # its actors and workers stop with it, before the process exits
            print("scdd-ray: terminated (SIGTERM); finished work is kept, rerun the same command to resume",
                  file=sys.stderr)
            return 143
        print("scdd-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # the library names the paths it writes; this catches what writes beneath it
        if e.errno not in ANTICIPATED_OS_ERRORS:
            raise
        print(f"scdd-ray: error: {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
