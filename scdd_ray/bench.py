"""Benchmarks behind `scdd-ray bench`: the production code paths, timed."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import tempfile
import time

import torch

from .backbones import distill_backbone_name
from .config import RecoverConfig, build_distill_config
from .core.configs import SUPERVISED
from .core.recover import synthesize
from .core.shards import plan_shards
from .dist.cluster import connect
from .dist.synthesis import run_ray
from .models import create_model, frozen, load_checkpoint, save_checkpoint, small_input
from .pipeline import distill
from .store import ShardStore


def random_checkpoint(arch: str, width: float, num_classes: int, image_size: int, directory: str):
    """A randomly initialised backbone saved and reloaded exactly as users' checkpoints are."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes, width, small_input(image_size))
    path = os.path.join(directory, "bench-backbone.pt")
    save_checkpoint(path, model, arch=arch, width=width, num_classes=num_classes, image_size=image_size,
                    small_input=small_input(image_size), mean=(0.5,) * 3, std=(0.25,) * 3, method="random-init")
    return load_checkpoint(path)


def bench_scaling(workers: list[int], *, arch: str, width: float, image_size: int, num_classes: int, shards: int,
                  iterations: int, address: str | None = None) -> dict:
    """The same synthesis job (`shards` shards of `num_classes` images) on k single-thread CPU actors, for each k.

    `img_iters_per_s` counts images x iterations per second once every actor
    is up (steady state); `end_to_end_img_iters_per_s` includes actor start-up.
    """
    connect(address)
    cfg = RecoverConfig(iterations=iterations, lr=0.25, bn_coef=1.0, bn_weights="first:10", jitter=2,
                        crop_scale=(0.5, 1.0), flip=False, classes_per_batch=num_classes)
    plan = plan_shards(num_classes, shards, num_classes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(arch, width, num_classes, image_size, tmp)
        for k in workers:
            store = ShardStore(os.path.join(tmp, f"w{k}"))
            store.open(f"bench-{k}")
            t0 = time.perf_counter()
            stats = run_ray(ckpt, plan, store, cfg, image_size, 0, num_workers=k, use_gpu=False, threads=1)
            wall = time.perf_counter() - t0
            work = stats["images_computed"] * iterations
            rows.append({"workers": k, "seconds": round(wall, 3), "startup_seconds": round(stats["startup_seconds"], 3),
                         "img_iters_per_s": round(work / stats["synthesis_seconds"], 2),
                         "end_to_end_img_iters_per_s": round(work / wall, 2)})
    base = rows[0]["img_iters_per_s"] / rows[0]["workers"]
    for r in rows:
        r["speedup_vs_first"] = round(r["img_iters_per_s"] / rows[0]["img_iters_per_s"], 3)
        r["parallel_efficiency"] = round(r["img_iters_per_s"] / (base * r["workers"]), 3)
    return {"benchmark": "scaling", "arch": arch, "width": width, "image_size": image_size,
            "num_classes": num_classes, "shards": shards, "iterations": iterations, "threads_per_worker": 1,
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "results": rows}


def bench_recover(*, arch: str, width: float, image_size: int, num_classes: int, batch: int, iterations: int,
                  threads: int, repeats: int = 3, warmup: int = 5, device: str = "cpu",
                  channels_last: bool | None = None, cfg: RecoverConfig | None = None, compile: bool = False) -> dict:
    """The production recover step (`recover.synthesize`) on a randomly initialised model.

    `img_iters_per_s` is images x iterations per second of the median of
    `repeats` timed runs, after a `warmup`-iteration run (allocator, kernels).
    `cfg` sets the augmentations and loss (its iteration count is ignored);
    by default the CIFAR-like settings of the reference comparison.
    """
    if device == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = frozen(create_model(arch, num_classes, width, small_input(image_size))).to(device)
    cfg = cfg or RecoverConfig(iterations=iterations, lr=0.25, bn_coef=0.01, bn_weights="first:10", jitter=4,
                               crop_scale=None, flip=True)
    cfg = dataclasses.replace(cfg, compile=compile or cfg.compile)
    targets = torch.arange(batch) % num_classes
    mean, std = (0.5,) * 3, (0.25,) * 3

    def run(iters: int) -> float:
        c = RecoverConfig(**{**cfg.__dict__, "iterations": iters})
        t0 = time.perf_counter()
        synthesize(model, targets, c, mean, std, image_size, seed=0, device=device, channels_last=channels_last,
                   log_every=10 ** 9)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(warmup)
    times = sorted(run(iterations) for _ in range(repeats))
    median = times[len(times) // 2]
    return {"benchmark": "recover", "arch": arch, "width": width, "image_size": image_size,
            "num_classes": num_classes, "batch": batch, "iterations": iterations, "threads": threads,
            "device": str(device), "repeats": repeats, "compile": compile, "seconds": [round(t, 4) for t in times],
            "img_iters_per_s": round(batch * iterations / median, 2),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__}


def _first_made(work: str, dataset: str, name: str) -> str | None:
    """The oldest model called `name` that some cell under `work` squeezed, so every later cell shares it."""
    found = glob.glob(os.path.join(glob.escape(work), f"{glob.escape(dataset)}-*", "backbones", name))
    return min(found, key=os.path.getmtime) if found else None


def models_row(report: dict, squeeze_meta: dict) -> dict:
    """One row of the model-size table from a distill report and its backbone's metadata."""
    work = report["num_images"] * report["config"]["recover"]["iterations"]
    return {"arch": report["arch"], "width": report["width"], "method": report["method"],
            "backbone_method": report["backbone_method"], "ipc": report["ipc"], "num_images": report["num_images"],
            "iterations": report["config"]["recover"]["iterations"],
            "recover_seconds": report["recover_seconds"],
            "recover_img_iters_per_s": round(work / report["recover_seconds"], 2),
            "squeeze_seconds": round(squeeze_meta.get("seconds", float("nan")), 2),
            "backbone_test_top1": squeeze_meta.get("test_top1"),
            "teacher_top1": report["teacher_top1"], "top1": report["top1"],
            "student": f"{report['student']} w{report['student_width']:g}",
            "posttrain_epochs": report["posttrain_epochs"], "posttrain_seconds": report["posttrain_seconds"],
            "total_seconds": report["total_seconds"], "image_size": report["image_size"],
            "num_classes": report["num_classes"]}


def bench_models(archs: list[str], methods: list[str], *, dataset: str = "digits", work: str, width: float, ipc: int,
                 seed: int, threads: int, overrides: dict | None = None, step_iterations: int = 100,
                 step_repeats: int = 5) -> dict:
    """The paper's model-size table in miniature: a full `distill` per (recovery arch, method).

    Each cell distills with its own kind of backbone (SSL for scdd,
    supervised for sre2l) at `width`, recovers IPC images per class with it,
    and post-trains the preset's student (the same for every cell, so only the
    recovery model changes) on the real test split. Recover throughput is
    images x iterations per second of that job's recover stage (one
    in-process worker, `threads` torch threads). A cell whose report.json
    exists is read, not rerun, so an interrupted table resumes; a backbone
    some cell in `work` already squeezed with the same settings is reused
    (e.g. by a second table with another `recover.bn_normalize`), not trained again.

    The job's throughput depends on what else ran on the machine meanwhile,
    so each arch's recover step is also timed afresh by every invocation
    (`step_img_iters_per_s`: `bench_recover` with the cells' recover settings
    and batch, median of `step_repeats`); run the final, collecting
    invocation on a quiet machine.
    """
    torch.set_num_threads(threads)
    # Settings that are not the preset's name the cell, so tables with other settings never collide.
    suffix = "".join(f"-{k.replace('.', '_')}-{v}" for k, v in sorted((overrides or {}).items())
                     if k not in ("data_dir", "num_gpus"))
    rows, step = [], {}
    for arch in archs:
        for method in methods:
            cell = f"{dataset}-{arch.replace(':', '_')}-w{width:g}-{method}-ipc{ipc}-seed{seed}{suffix}"
            out = os.path.join(work, cell)
            report_path = os.path.join(out, "report.json")
            if not os.path.isfile(report_path):
                given = {"arch": arch, "width": width, "method": method, "ipc": ipc, "seed": seed, "num_workers": 1,
                         **(overrides or {})}
                cfg = build_distill_config(dataset, out, given)
                for field, name in (("backbone", distill_backbone_name(cfg)),
                                    ("teacher", distill_backbone_name(cfg, SUPERVISED))):
                    found = _first_made(work, dataset, name)
                    if found and field not in given:
                        given[field] = found
                distill.run(distill.prepare(build_distill_config(dataset, out, given)))
            with open(report_path) as f:
                report = json.load(f)
            rows.append(models_row(report, load_checkpoint(report["backbone"]).meta))
            if arch not in step:  # the step does not depend on the weights: one timing per arch
                rc = RecoverConfig(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in report["config"]["recover"].items()})
                step[arch] = bench_recover(arch=arch, width=width, image_size=report["image_size"],
                                           num_classes=report["num_classes"], batch=rc.classes_per_batch,
                                           iterations=step_iterations, threads=threads, repeats=step_repeats,
                                           device="cuda" if (overrides or {}).get("num_gpus") else "cpu", cfg=rc)
            rows[-1]["step_img_iters_per_s"] = step[arch]["img_iters_per_s"]
    return {"benchmark": "models", "dataset": dataset, "width": width, "ipc": ipc, "seed": seed,
            "threads": threads, "step_iterations": step_iterations, "step_repeats": step_repeats,
            "overrides": overrides or {}, "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": rows}
