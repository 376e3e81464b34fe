"""`scdd-ray bench models`: the paper's model-size table in miniature, one full `distill` per
(recovery arch, method), with recover throughput and the student's top-1."""
from __future__ import annotations

import os
import platform

import torch

from ..config import build_config
from ..core.shards import plan_shards
from ..models.checkpoint import load_checkpoint
from ..pipeline import distill
from ..schema import DistillConfig
from ..store.atomic import atomic_write_json
from .cells import read_current, settings_key, suffix
from .recover import bench_recover

STEP_ITERATIONS, STEP_REPEATS = 100, 5  # the recover step timing of each arch (median of the repeats)


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
            "teacher": report["teacher"], "teacher_top1": report["teacher_top1"], "top1": report["top1"],
            "student": f"{report['student']} w{report['student_width']:g}",
            "posttrain_epochs": report["posttrain_epochs"], "posttrain_seconds": report["posttrain_seconds"],
            "total_seconds": report["total_seconds"], "image_size": report["image_size"],
            "num_classes": report["num_classes"]}


def cell_config(work: str, arch: str, method: str, overrides: dict) -> DistillConfig:
    """The distill run of one cell, in its own directory under `work`; every cell caches its models in
    `work`/models (unless `models_dir` says otherwise), so cells and later tables share them."""
    given = {"num_workers": 1, "models_dir": os.path.join(work, "models"), **overrides, "arch": arch,
             "method": method}
    base = build_config({**given, "out": work})
    name = (f"{base.dataset}-{arch.replace(':', '_')}-w{base.width:g}-{method}-ipc{base.ipc}-seed{base.seed}"
            f"{suffix(overrides, ('dataset', 'width', 'ipc', 'seed', 'arch', 'method'))}")
    return build_config({**given, "out": os.path.join(work, name)})


def bench_models(archs: list[str], methods: list[str], *, work: str, threads: int, overrides: dict) -> dict:
    """A full `distill` per (recovery arch, method): each cell recovers with its own kind of backbone (SSL
    for scdd, supervised for sre2l) of that arch, and post-trains the preset's student (the same for every
    cell, so only the recovery model changes); top-1 on the real test split. Recover throughput is images
    x iterations per second of the cell's recover stage (one in-process worker, `threads` torch threads).

    A cell whose report exists is read, not rerun, so an interrupted table
    resumes (unless the settings it resolves to changed since, a preset
    say). The job's throughput depends on what else ran on the machine
    meanwhile, so each arch's recover step is also timed afresh by
    every invocation (`step_img_iters_per_s`, the cells' recover settings and
    batch); run the final, collecting invocation on a quiet machine.
    """
    torch.set_num_threads(threads)
    rows, step = [], {}
    for arch in archs:
        for method in methods:
            cfg = cell_config(work, arch, method, overrides)
            path, key = os.path.join(cfg.out, "report-bench.json"), settings_key(cfg)
            report = read_current(path, key)
            if report is None:
                report = {**distill.run(distill.prepare(cfg)), "cell_settings": settings_key(cfg)}
                atomic_write_json(path, report)
            rows.append(models_row(report, load_checkpoint(report["backbone"]).meta))
            if arch not in step:  # the step does not depend on the weights: one timing per arch
                batch = len(plan_shards(report["num_classes"], cfg.ipc, cfg.recover.classes_per_batch,
                                        cfg.recover.ipc_per_shard)[0])
                step[arch] = bench_recover(cfg, num_classes=report["num_classes"], batch=batch,
                                           iterations=STEP_ITERATIONS, threads=threads, repeats=STEP_REPEATS)
            rows[-1]["step_img_iters_per_s"] = step[arch]["img_iters_per_s"]
    return {"benchmark": "models", "dataset": cfg.dataset, "width": cfg.width, "ipc": cfg.ipc, "seed": cfg.seed,
            "threads": threads, "step_iterations": STEP_ITERATIONS, "step_repeats": STEP_REPEATS,
            "overrides": overrides, "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": rows}
