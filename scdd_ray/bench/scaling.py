"""`scdd-ray bench scaling`: the same synthesis job on 1, 2, ... single-thread CPU Ray actors."""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time

import torch

from ..core.shards import plan_shards
from ..dist.cluster import connect
from ..dist.synthesis import run_ray
from ..schema import DistillConfig
from ..store.shards import ShardStore
from .recover import random_checkpoint


def bench_scaling(cfg: DistillConfig, workers: list[int], shards: int) -> dict:
    """`shards` shards of one batch each (`recover.classes_per_batch` images, one per class of a randomly
    initialised model of `cfg`'s arch) recovered with `cfg.recover` on k single-thread actors, for each k.

    `img_iters_per_s` counts images x iterations per second once every actor
    is up (steady state); `end_to_end_img_iters_per_s` includes actor start-up.
    """
    connect(cfg.address)
    rcfg = cfg.recover
    num_classes = rcfg.classes_per_batch
    plan = plan_shards(num_classes, shards, num_classes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(cfg.arch, cfg.width, num_classes, cfg.image_size, tmp)
        for k in workers:
            store = ShardStore(os.path.join(tmp, f"w{k}"))
            store.open(f"bench-{k}")
            t0 = time.perf_counter()
            stats = run_ray(ckpt, plan, store, rcfg, cfg.image_size, 0, num_workers=k, use_gpu=False, threads=1)
            wall = time.perf_counter() - t0
            work = stats["images_computed"] * rcfg.iterations
            rows.append({"workers": k, "seconds": round(wall, 3), "startup_seconds": round(stats["startup_seconds"], 3),
                         "img_iters_per_s": round(work / stats["synthesis_seconds"], 2),
                         "end_to_end_img_iters_per_s": round(work / wall, 2)})
    base = rows[0]["img_iters_per_s"] / rows[0]["workers"]
    for r in rows:
        r["speedup_vs_first"] = round(r["img_iters_per_s"] / rows[0]["img_iters_per_s"], 3)
        r["parallel_efficiency"] = round(r["img_iters_per_s"] / (base * r["workers"]), 3)
    return {"benchmark": "scaling", "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width,
            "image_size": cfg.image_size, "num_classes": num_classes, "shards": shards,
            "iterations": rcfg.iterations, "recover": dataclasses.asdict(rcfg), "threads_per_worker": 1,
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "results": rows}
