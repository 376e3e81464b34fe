"""`scdd-ray bench recover`: images x iterations per second of the production recover step, and of the
reference loop (bench.reference) on the same model, batch and settings, timed alternately: their ratio."""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time

import torch

from ..core.recover import synthesize
from .reference import reference_recover
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.factory import create_model, small_input
from ..models.runtime import frozen
from ..schema import DistillConfig

WARMUP = 5  # iterations run before timing (allocator, kernels)


def random_checkpoint(arch: str, width: float, num_classes: int, image_size: int, directory: str):
    """A randomly initialised backbone saved and reloaded exactly as users' checkpoints are."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes, width, small_input(image_size))
    path = os.path.join(directory, "bench-backbone.pt")
    save_checkpoint(path, model, arch=arch, width=width, num_classes=num_classes, image_size=image_size,
                    small_input=small_input(image_size), mean=(0.5,) * 3, std=(0.25,) * 3, method="random-init")
    return load_checkpoint(path)


def bench_recover(cfg: DistillConfig, *, num_classes: int, batch: int, iterations: int, threads: int,
                  repeats: int, channels_last: bool | None = None) -> dict:
    """The production recover step (`recover.synthesize`) of `cfg` (its arch, width, image size and recover
    settings; on the GPU with `num_gpus`) on a randomly initialised model of `num_classes` classes.

    `img_iters_per_s` is images x iterations per second of the median of
    `repeats` timed runs of `iterations` iterations, after a short warm-up run;
    `reference_img_iters_per_s` the same of the reference loop (float32 NCHW,
    hooks with permute/contiguous/var, a host read every step), timed in
    turns with ours so that a change in the machine's load hits both, and
    `vs_reference` their ratio. A compiled step (`recover.compile`) is timed
    after its compile (the warm-up run); `warmup_seconds` says what that took.
    """
    device = "cuda" if cfg.num_gpus else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = frozen(random_checkpoint(cfg.arch, cfg.width, num_classes, cfg.image_size, tmp).build()).to(device)
    targets = torch.arange(batch) % num_classes
    mean, std = (0.5,) * 3, (0.25,) * 3

    with tempfile.TemporaryDirectory() as tmp:  # its own copy: ours puts the model in channels_last
        ref_model = frozen(random_checkpoint(cfg.arch, cfg.width, num_classes, cfg.image_size, tmp).build()).to(device)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def ours(iters: int) -> None:
        synthesize(model, targets, dataclasses.replace(cfg.recover, iterations=iters), mean, std, cfg.image_size,
                   seed=cfg.seed, device=device, channels_last=channels_last, log_every=10 ** 9)

    def reference(iters: int) -> None:
        reference_recover(ref_model, targets, dataclasses.replace(cfg.recover, iterations=iters), mean, std,
                          cfg.image_size, seed=cfg.seed, device=device)

    warm = timed(lambda: ours(WARMUP))
    timed(lambda: reference(WARMUP))
    times, ref_times = [], []
    for _ in range(repeats):
        times.append(timed(lambda: ours(iterations)))
        ref_times.append(timed(lambda: reference(iterations)))
    times, ref_times = sorted(times), sorted(ref_times)
    median, ref_median = times[len(times) // 2], ref_times[len(ref_times) // 2]
    return {"benchmark": "recover", "arch": cfg.arch, "width": cfg.width, "image_size": cfg.image_size,
            "num_classes": num_classes, "batch": batch, "iterations": iterations, "threads": threads,
            "device": device, "repeats": repeats, "compile": cfg.recover.compile,
            "recover": dataclasses.asdict(cfg.recover), "seconds": [round(t, 4) for t in times],
            "img_iters_per_s": round(batch * iterations / median, 2), "warmup_seconds": round(warm, 2),
            "reference_seconds": [round(t, 4) for t in ref_times],
            "reference_img_iters_per_s": round(batch * iterations / ref_median, 2),
            "vs_reference": round(ref_median / median, 3),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__}
