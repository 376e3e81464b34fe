"""Our production recover step against a straightforward loop written the way the reference scripts do it.

(a) reference: BN statistics in forward hooks via x.mean([0,2,3]) and
    x.permute(1,0,2,3).contiguous().view(C,-1).var(1, unbiased=False), the
    loss read back to the host (`loss.item()`) every step, float32, NCHW,
    clipping channel by channel;
(b) production: `scdd_ray.core.recover.synthesize` (one fused `torch.var_mean` per
    BN layer, no host sync inside the loop, channels_last unless told not to).

Both run in one process on the same model, batch, augmentation functions and
thread count, alternating, and each is timed `--repeats` times after a warm-up;
the median images x iterations per second is reported. A separate short run
from the same start and the same random draws compares the images. Model and
recover settings are a preset's (`--dataset`, default cifar10's CPU preset)
with `--set` overrides; the committed measurement used

    python benchmarks/recover_vs_reference.py --set recover.bn_coef=0.01 --set recover.flip=true \
        --json benchmarks/results/cifar10_recover_vs_reference.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

from scdd_ray.bench.reference import reference_recover
from scdd_ray.core.recover import synthesize
from scdd_ray.models.factory import create_model, small_input
from scdd_ray.models.runtime import frozen

from _recipe import add_recipe_args, recipe

IMAGE_CHECK_ITERATIONS = 10  # the short run that compares the images


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--timed-iterations", type=int, default=20, help="iterations per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", required=True)
    add_recipe_args(ap, "cifar10")
    a = ap.parse_args()
    rc = recipe(a, {"recover.iterations": a.timed_iterations})
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    num_classes = min(a.batch, 100)
    model = frozen(create_model(rc.arch, num_classes, rc.width, small_input(rc.image_size)))
    # Non-trivial BN statistics so the BN term and its gradient are realistic.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    targets = torch.arange(a.batch) % num_classes
    cfg = rc.recover
    if cfg.crop_scale is not None or cfg.augment_per == "batch":
        raise SystemExit("the reference loop has no random-resized-crop: give --set recover.crop_scale=null")
    run_seed = rc.seed

    def ours(channels_last=True, iterations=a.timed_iterations):
        c = dataclasses.replace(cfg, iterations=iterations)
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return synthesize(model, targets, c, mean, std, rc.image_size, seed=run_seed, channels_last=channels_last,
                          log_every=10 ** 9).images

    def ref(iterations=a.timed_iterations):
        c = dataclasses.replace(cfg, iterations=iterations)
        model.to(memory_format=torch.contiguous_format)
        return reference_recover(model, targets, c, mean, std, rc.image_size, seed=run_seed)

    variants = {"reference": ref, "ours": ours, "ours_nchw": lambda: ours(channels_last=False)}
    for fn in variants.values():  # warm-up: allocator, kernels, first-call overheads
        fn()
    times = {k: [] for k in variants}
    for _ in range(a.repeats):  # alternate so drifts in machine load hit every variant alike
        for k, fn in variants.items():
            times[k].append(timed(fn))
    work = a.batch * a.timed_iterations
    rows = {k: {"median_seconds": round(statistics.median(v), 4), "img_iters_per_s": round(work / statistics.median(v), 1),
                "all_seconds": [round(t, 4) for t in v]} for k, v in times.items()}
    base = rows["reference"]["img_iters_per_s"]
    for r in rows.values():
        r["speedup_vs_reference"] = round(r["img_iters_per_s"] / base, 3)
    # Same start, same random draws, 10 iterations: how far apart do the images end up?
    img_ref = ref(iterations=IMAGE_CHECK_ITERATIONS)
    diffs = {}
    for k, kw in (("ours", {}), ("ours_nchw", {"channels_last": False})):
        d = (ours(iterations=IMAGE_CHECK_ITERATIONS, **kw).int() - img_ref.int()).abs()
        diffs[k] = {"max_abs_uint8": int(d.max()), "mean_abs_uint8": round(float(d.float().mean()), 4),
                    "share_pixels_exact": round(float((d == 0).float().mean()), 4)}
    res = {"benchmark": "recover_vs_reference", "command": "python benchmarks/recover_vs_reference.py "
           + " ".join(sys.argv[1:]), "arch": rc.arch, "width": rc.width, "image_size": rc.image_size,
           "recover": dataclasses.asdict(cfg), "batch": a.batch, "iterations": a.timed_iterations,
           "repeats": a.repeats, "threads": a.threads,
           "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "results": rows, "image_difference_after_10_iterations": diffs}
    with open(a.json + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(a.json + ".tmp", a.json)
    print(json.dumps({k: (v["img_iters_per_s"], v["speedup_vs_reference"]) for k, v in rows.items()}))
    print(json.dumps(diffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
