"""Peak memory of one recover step (forward + backward to the images) with and without BN matching, on CPU.

    python benchmarks/bn_memory.py --json benchmarks/results/in1k_bn_memory.json     # ResNet-50, 224 px, batch 8

Each variant runs in a fresh process (peak resident memory, `ru_maxrss`, is a
per-process high-water mark), one thread, on a randomly initialised model
with non-trivial BN statistics:

  ce_only     the step without BN matching: the floor
  previous    BN statistics as the recover step computed them before: in each BN layer's forward hook, an
              upcast copy, a shifted copy and its square, under plain autograd (which keeps the shifted
              float32 copy of every layer until backward)
  production  scdd_ray.core.bn.BNMatch as the recover step uses it now

in float32 and under bf16 autocast (what a GPU runs; torch runs bf16 autocast on CPU too). The figure
is the peak above the memory held just before the step (model, images, imports).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("ce_only", "previous", "production")
DTYPES = ("fp32", "bf16")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def previous_hooks(model, weights):
    """The BN term as the recover step computed it before (forward hooks, plain autograd)."""
    from scdd_ray.core.bn import bn_layers, match_term

    terms = []

    def hook(module, inputs, output):
        x = inputs[0].float()
        rm = module.running_mean.float()
        flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        d = flat - rm
        md = d.mean(0)
        var = (d * d).mean(0) - md * md
        terms.append(match_term(md + rm, var, rm, module.running_var.float()))

    handles = [m.register_forward_hook(hook) for m in bn_layers(model)]

    def loss():
        return sum(w * t for w, t in zip(weights, terms))
    return handles, loss


def child(a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from scdd_ray.core.bn import BNMatch, bn_layers, parse_bn_weights
    from scdd_ray.models.factory import create_model, small_input
    from scdd_ray.models.runtime import frozen

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = frozen(create_model(a.arch, 1000, 1.0, small_input(a.size))).to(memory_format=torch.channels_last)
    for m in bn_layers(model):
        m.running_mean.normal_(0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    weights = parse_bn_weights("first:10").resolve(len(bn_layers(model)))
    x = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    targets = torch.arange(a.batch)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if a.dtype == "bf16" else torch.autocast("cpu", enabled=False)
    if a.variant == "production":
        ctx = BNMatch(model, weights).__enter__()
        bn = ctx.loss
    elif a.variant == "previous":
        _, bn = previous_hooks(model, weights)
    else:
        bn = None
    before, peak_before = rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with amp:
        logits = model(x)
    loss = F.cross_entropy(logits.float(), targets)
    if bn is not None:
        loss = loss + 0.01 * bn()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": a.variant, "dtype": a.dtype, "rss_before_step_mib": round(before, 1),
            "peak_mib": round(peak, 1), "peak_above_before_mib": round(peak - before, 1),
            "high_water_before_step_mib": round(peak_before, 1), "step_seconds": round(seconds, 2),
            "grad_norm": float(x.grad.norm())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(child(a)))
        return 0
    rows = []
    for dtype in a.dtypes.split(","):
        for variant in a.variants.split(","):
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--dtype", dtype, "--arch", a.arch,
                                  "--size", str(a.size), "--batch", str(a.batch)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    import torch

    res = {"benchmark": "bn_memory", "command": "python benchmarks/bn_memory.py " + " ".join(sys.argv[1:]),
           "arch": a.arch, "image_size": a.size, "batch": a.batch, "threads": 1, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "rows": rows}
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
