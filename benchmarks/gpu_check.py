"""GPU check: correctness, speed and a small end-to-end run of our GPU code paths; no Ray, no install.

    python3 benchmarks/gpu_check.py --out DIR --budget-s 280                 # a GPU machine (benchmarks/device_run.py)
    python3 benchmarks/gpu_check.py --device cpu --quick --out DIR           # the same code paths on CPU, ~1 min

Prints a table and writes DIR/gpu_check.json (after every part and every
compiled item, so a run cut short still leaves what it measured). Nothing
new starts once --budget-s is spent; each torch.compile item runs in a
child process that is stopped when the budget ends (a compile cannot be
interrupted in-process). `--parts` takes any subset. Parts:

  correctness  per-channel BN mean/variance and the BN loss on the device against float64; the
               recover loss and its input gradient in bf16 autocast against fp32; a few hundred
               recover iterations from one seed in bf16 and in fp32, images compared
  peak         dense bf16 matmul (8192^3) TFLOP/s on the device: the yardstick of "how close"
  recover      images x iterations / s of the production step (core.recover.synthesize) per model
               and variant (fp32 NCHW, channels_last, bf16, bf16 + channels_last, + torch.compile)
               and of the reference-style loop (benchmarks/recover_vs_reference.py) for the ratio;
               FLOPs per image-iteration (torch.utils.flop_counter), achieved TFLOP/s and its share
               of the measured peak
  posttrain    images / s of the post-train step (student + teacher, soft labels, mixing: the
               production core.posttrain.train_step), fp32 vs bf16, + compile, + the set kept encoded
  e2e          CIFAR-10 in one process: supervised squeeze at full width, recover IPC 10, post-train,
               top-1 on the real test split, from the Hugging Face Parquet files in --data-dir
               (copy ../shared/data/cifar10/*.parquet to data_cache/cifar10 first); skipped with a
               message when they are absent. --quick uses the synthetic dataset unless given files.

fp32 here is what torch runs by default: cuDNN may use TF32 for convolutions (recorded in the JSON).
On CPU, autocast is off in our code (it pays only on GPUs), so bf16 equals fp32 there.
Recover, post-train and squeeze settings are the CIFAR-10 preset's (its GPU preset on a GPU;
`--dataset`, `--set KEY=VALUE` override), sizes and budgets the plan's below; on CPU the
compiled variants use the `eager` backend (Dynamo's capture without code generation).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

# This folder (recover_vs_reference, _recipe) and the checkout (scdd_ray) on the path however the script is
# started: as a file, through runpy, or from another directory.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from scdd_ray.bench.reference import reference_recover
from scdd_ray.core.bn import BNMatch, batch_stats, bn_layers, parse_bn_weights
from scdd_ray.core.evaluation import top1
from scdd_ray.core.posttrain import PostTrainer, epoch_batches, train_step
from scdd_ray.core.recover import recover_objective, synthesize
from scdd_ray.core.shards import plan_shards, recover_shard
from scdd_ray.core.squeeze import squeeze
from scdd_ray.data import DatasetInfo, load_split, sample_per_class
from scdd_ray.data.parquet import has_parquet_layout
from scdd_ray.models.factory import create_model, small_input
from scdd_ray.models.runtime import frozen
from scdd_ray.store.encoded import EncodedImages
from scdd_ray.store.png import encode_png

from _recipe import add_recipe_args, recipe

# Tolerances, stated once. Relative errors are max over channels of |x - x64| / (|x64| + scale).
BN_STATS_RTOL = 1e-4  # fp32 per-channel mean and variance on the device vs float64
BN_LOSS_RTOL = 1e-4  # fp32 BN loss on the device (TF32 off) vs a float64 forward of the same model and input
AMP_LOSS_RTOL = 2e-2  # bf16 autocast recover loss vs fp32 (bf16 keeps 8 bits of mantissa: ~0.4% per op)
AMP_GRAD_COS = 0.99  # cosine similarity of the bf16 and fp32 gradients with respect to the images
IMAGE_FLOOR_FACTOR = 3.0  # bf16 images may differ from fp32 by 3x what another fp32 layout changes
IMAGE_MIN_TOL = 1.0  # ... and by at least 1 grey level in mean absolute difference
LOSS_END_RTOL = 0.05  # final CE and BN terms of the bf16 run within 5% of the fp32 run's
H100_BF16_MATMUL_TFLOPS = 790.0  # the figure for an 8192^3 bf16 matmul on an H100
MIN_CHILD_S = 30.0  # a compiled item is not started with less of the budget left (start-up alone takes ~10 s)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU plan, or the tiny CPU one of --quick."""

    recover_models: tuple  # (name, arch, width, image size, batch, classes)
    recover_iters: int
    repeats: int
    amp_iters: int  # recover iterations of the bf16-vs-fp32 image comparison
    matmul_n: int
    posttrain: tuple  # (name, image size, student width, batch)
    posttrain_steps: int
    e2e_width: float
    e2e_squeeze_epochs: int
    e2e_recover_iters: int
    e2e_ipc: int
    e2e_posttrain_epochs: int
    compile_models: tuple  # recover models timed with torch.compile too (compiling takes minutes)
    recipe: object = None  # the DistillConfig whose squeeze, recover and post-train settings every part uses


def models(*specs: str) -> tuple:
    """Recover models from ARCH:WIDTH:SIZE:BATCH specs: (name, arch, width, size, batch, classes)."""
    out = []
    for spec in specs:
        arch, width, size, batch = spec.split(":")
        out.append((f"{arch}-w{float(width):g}-{size}", arch, float(width), int(size), int(batch),
                    100 if int(size) <= 64 else 1000))
    return tuple(out)


GPU_PLAN = Plan(recover_models=models("resnet18:1:32:100", "resnet50:1:224:50", "resnet101:1:224:50"),
                recover_iters=20, repeats=3, amp_iters=300, matmul_n=8192,
                posttrain=(("cifar-32", 32, 1.0, 64), ("imagenet-224", 224, 1.0, 64)), posttrain_steps=20,
                e2e_width=1.0, e2e_squeeze_epochs=10, e2e_recover_iters=1000, e2e_ipc=10, e2e_posttrain_epochs=200,
                compile_models=("resnet18-w1-32", "resnet50-w1-224", "resnet101-w1-224"))
QUICK_PLAN = dataclasses.replace(
    GPU_PLAN, recover_models=models("resnet18:0.125:16:8", "resnet50:0.0625:72:2", "resnet101:0.0625:72:2"),
    recover_iters=2, repeats=1, amp_iters=10, matmul_n=256, posttrain_steps=2,
    posttrain=(("cifar-16", 16, 0.125, 8), ("imagenet-72", 72, 0.0625, 4)), e2e_width=0.125, e2e_squeeze_epochs=1,
    e2e_recover_iters=5, e2e_ipc=2, e2e_posttrain_epochs=2, compile_models=("resnet18-w0.125-16",))


class Budget:
    """Wall-clock budget: optional items (compiling above all) are skipped, and said so, when it runs out."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def check(value: float, limit: float, below: bool = True) -> dict:
    return {"value": value, "tolerance": limit, "pass": bool(value <= limit if below else value >= limit)}


def rel_err(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | float = 0.0) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float(((x - ref).abs() / (ref.abs() + scale).clamp_min(1e-30)).max())


def bn_model(arch: str, width: float, size: int, classes: int, device, channels_last: bool = True) -> nn.Module:
    """A frozen model with non-trivial BN statistics, as the reference comparison uses."""
    torch.manual_seed(0)
    model = frozen(create_model(arch, classes, width, small_input(size)))
    for m in bn_layers(model):
        m.running_mean.normal_(0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt)


# --- correctness ------------------------------------------------------------------------

def check_bn_stats(device: torch.device) -> dict:
    """batch_stats (both layouts) against float64, on activations far from zero (mean 10, std 0.1)."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(64, 32, 14, 14, generator=g, dtype=torch.float64) * 0.1 + 10.0
    mean64, var64 = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    shift = (mean64 + 0.05).float().to(device)  # a running mean near, not at, the batch mean
    out = {}
    for name, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
        x = x64.float().to(device).contiguous(memory_format=fmt)
        mean, var = batch_stats(x, shift)
        out[f"mean_{name}"] = check(rel_err(mean, mean64, var64.sqrt()), BN_STATS_RTOL)
        out[f"var_{name}"] = check(rel_err(var, var64), BN_STATS_RTOL)
    return out


def reference_bn_loss(model: nn.Module, x: torch.Tensor, weights: list[float]) -> float:
    """The BN loss in float64 on the CPU, written out plainly (no code shared with core.bn)."""
    m64 = copy.deepcopy(model).double().cpu().to(memory_format=torch.contiguous_format)
    terms = []

    def hook(mod, inputs, output):
        a = inputs[0]
        mean, var = a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=False)
        terms.append(torch.linalg.vector_norm(mean - mod.running_mean) + torch.linalg.vector_norm(var - mod.running_var))

    handles = [m.register_forward_hook(hook) for m in bn_layers(m64)]
    with torch.no_grad():
        m64(x.double().cpu().contiguous())
    for h in handles:
        h.remove()
    return float(sum(w * t for w, t in zip(weights, terms)))


@contextlib.contextmanager
def allow_tf32(on: bool):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_losses(p: Plan, device: torch.device) -> dict:
    """BN loss vs float64; recover loss and image gradient in bf16 autocast vs fp32."""
    _, arch, width, size, batch, classes = p.recover_models[0]
    model = bn_model(arch, width, size, classes, device)
    weights = parse_bn_weights(p.recipe.recover.bn_weights).resolve(len(bn_layers(model)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    targets = (torch.arange(batch) % classes).to(device)
    ref = reference_bn_loss(model, x, weights)  # before our hooks are on the model (a deep copy would keep them)
    out = {}
    with BNMatch(model, weights) as bnm:
        for tf32 in (False, True):  # our maths in true fp32; then as torch runs fp32 convs by default (TF32)
            with torch.no_grad(), allow_tf32(tf32):
                model(x)
                bn32 = float(bnm.loss())
            err = abs(bn32 - ref) / abs(ref)
            if tf32:
                out["bn_loss_vs_float64_with_tf32"] = err  # informative: TF32 rounds conv inputs to 10 bits
            else:
                out["bn_loss_vs_float64"] = check(err, BN_LOSS_RTOL)
        grads, losses = {}, {}
        for amp in ("none", "bf16"):
            xi = x.clone().requires_grad_(True)
            ce, bn = recover_objective(model, bnm, device, xi, targets, amp=amp)
            loss = ce + p.recipe.recover.bn_coef * bn
            loss.backward()
            grads[amp], losses[amp] = xi.grad.double().flatten(), float(loss.detach())
    out["recover_loss_bf16_vs_fp32"] = check(abs(losses["bf16"] - losses["none"]) / abs(losses["none"]), AMP_LOSS_RTOL)
    out["recover_grad_cosine_bf16_vs_fp32"] = check(float(F.cosine_similarity(grads["bf16"], grads["none"], dim=0)),
                                                    AMP_GRAD_COS, below=False)
    return out


def check_images(p: Plan, device: torch.device) -> dict:
    """`amp_iters` recover iterations from one seed: bf16 vs fp32 images, against the fp32 layout floor."""
    _, arch, width, size, batch, classes = p.recover_models[0]
    targets = torch.arange(batch) % classes
    cfg = dataclasses.replace(p.recipe.recover, iterations=p.amp_iters)
    runs = {}
    for name, amp, cl in (("fp32", "none", True), ("fp32_nchw", "none", False), ("bf16", "bf16", True)):
        model = bn_model(arch, width, size, classes, device, channels_last=cl)
        runs[name] = synthesize(model, targets, dataclasses.replace(cfg, amp=amp), (0.5,) * 3, (0.25,) * 3, size,
                                seed=p.recipe.seed, device=device, channels_last=cl)

    def mad(a, b):
        return float((runs[a].images.float() - runs[b].images.float()).abs().mean())

    floor = mad("fp32_nchw", "fp32")
    diff = mad("bf16", "fp32")
    return {"iterations": p.amp_iters,
            "images_mean_abs_diff_fp32_layouts": floor,
            "images_mean_abs_diff_bf16_vs_fp32": check(diff, max(IMAGE_FLOOR_FACTOR * floor, IMAGE_MIN_TOL)),
            "ce_end_bf16_vs_fp32": check(abs(runs["bf16"].loss_ce - runs["fp32"].loss_ce)
                                         / max(abs(runs["fp32"].loss_ce), 1e-3), LOSS_END_RTOL),
            "bn_end_bf16_vs_fp32": check(abs(runs["bf16"].loss_bn - runs["fp32"].loss_bn)
                                         / abs(runs["fp32"].loss_bn), LOSS_END_RTOL),
            "losses_end": {k: [round(r.loss_ce, 5), round(r.loss_bn, 5)] for k, r in runs.items()}}


# --- peak, recover speed -------------------------------------------------------------------

def peak_matmul(p: Plan, device: torch.device) -> dict:
    n = p.matmul_n
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(3):
        a @ b
    t = timed(lambda: [a @ b for _ in range(reps)], device)
    return {"n": n, "dtype": "bfloat16", "tflops": sig(2 * n ** 3 * reps / t / 1e12)}


VARIANTS = {  # name: (channels_last, amp, compile)
    "fp32_nchw": (False, "none", False), "fp32_channels_last": (True, "none", False),
    "bf16_nchw": (False, "bf16", False), "bf16_channels_last": (True, "bf16", False),
    "bf16_channels_last_compile": (True, "bf16", True),
}


UNCOMPILED = "bf16_channels_last"  # what the compiled variant is compared with (the production default)
COMPILED = [v for v, (_, _, comp) in VARIANTS.items() if comp]


def flops_per_image_iteration(model: nn.Module, batch: int, size: int, classes: int, device) -> float:
    """Forward + backward (to the images) FLOPs of one recover iteration, per image."""
    weights = parse_bn_weights("first:10").resolve(len(bn_layers(model)))
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    targets = (torch.arange(batch) % classes).to(device)
    with BNMatch(model, weights) as bnm, FlopCounterMode(display=False) as fc:
        ce, bn = recover_objective(model, bnm, device, x, targets, amp="none")
        (ce + 0.01 * bn).backward()
    return fc.get_total_flops() / batch


def time_variants(p: Plan, spec: tuple, names: list[str], device: torch.device) -> dict:
    """Median images x iterations / s of each named variant (and "reference"), repeats alternating."""
    name, arch, width, size, batch, classes = spec
    targets = torch.arange(batch) % classes
    cfg = dataclasses.replace(p.recipe.recover, iterations=p.recover_iters)
    runs = {}
    for v in names:
        if v == "reference":  # fp32 NCHW, statistics by permute/reshape/var in hooks, loss.item() every step
            model = bn_model(arch, width, size, classes, device, channels_last=False)
            runs[v] = functools.partial(_reference, model, targets, cfg, size, device, p.recipe.seed)
            continue
        cl, amp, comp = VARIANTS[v]
        model = bn_model(arch, width, size, classes, device, channels_last=cl)  # its own copy: compile hooks stay
        runs[v] = functools.partial(_ours, model, targets, dataclasses.replace(cfg, amp=amp, compile=comp), size,
                                    device, cl, p.recipe.seed)
    warm = {v: timed(lambda run=run: run(3), device) for v, run in runs.items()}  # compiling happens here
    times = {v: [] for v in runs}
    for _ in range(p.repeats):  # alternate, so a drift in clocks or load hits every variant alike
        for v, run in runs.items():
            times[v].append(timed(lambda run=run: run(p.recover_iters), device))
    return {v: {"img_iters_per_s": round(batch * p.recover_iters / statistics.median(t), 2),
                "warmup_seconds": round(warm[v], 2)} for v, t in times.items()}


def _ours(model, targets, cfg, size, device, channels_last, seed, iterations):
    synthesize(model, targets, dataclasses.replace(cfg, iterations=iterations), (0.5,) * 3, (0.25,) * 3, size,
               seed=seed, device=device, channels_last=channels_last, log_every=10 ** 9)


def _reference(model, targets, cfg, size, device, seed, iterations):
    reference_recover(model, targets, dataclasses.replace(cfg, iterations=iterations), (0.5,) * 3, (0.25,) * 3, size,
                      seed=seed, device=device)


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (a CPU's TFLOP/s would round to 0 at a fixed number of decimals)."""
    return float(f"{x:.{digits}g}")


def rate_row(row: dict, rates: dict, peak: float) -> None:
    """Add `rates` to a model's row: ratio to the reference loop, TFLOP/s, share of the peak."""
    flops = row["gflops_per_image_iteration"] * 1e9
    for v, r in rates.items():
        tflops = r["img_iters_per_s"] * flops / 1e12
        row["variants"][v] = {**r, "vs_reference": round(r["img_iters_per_s"] / row["reference_img_iters_per_s"], 3),
                              "tflops": sig(tflops), "share_of_peak": sig(tflops / peak)}


def time_recover_model(p: Plan, spec: tuple, device: torch.device, peak: float) -> dict:
    """Every variant but the compiled one (timed last, budget permitting: `compile_recover`)."""
    name, arch, width, size, batch, classes = spec
    rates = time_variants(p, spec, [v for v, (_, _, comp) in VARIANTS.items() if not comp] + ["reference"], device)
    flops = flops_per_image_iteration(bn_model(arch, width, size, classes, device), batch, size, classes, device)
    row = {"arch": arch, "width": width, "image_size": size, "batch": batch, "augment": "flip + jitter 4",
           "gflops_per_image_iteration": sig(flops / 1e9),
           "reference_img_iters_per_s": rates["reference"]["img_iters_per_s"], "variants": {}, "skipped": {}}
    rate_row(row, rates, peak)
    return row


def in_child(a: argparse.Namespace, what: str, budget: Budget) -> tuple[dict | None, str | None]:
    """Run one compiled item (`--child what`) in a child process, stopped when the budget runs out: a compile
    cannot be interrupted in-process, and it can take minutes. Returns (its result, None) or (None, why not)."""
    left = budget.left()
    if left < MIN_CHILD_S:
        return None, "time budget"
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", what]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return None, f"time budget: stopped after {left:.0f} s"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("CHILD ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"failed (exit {r.returncode}): {tail[:300]}"
    return json.loads(lines[-1][len("CHILD "):]), None


def child(a: argparse.Namespace, p: Plan, device: torch.device) -> dict:
    """What `in_child` runs: the compiled variants of one recover model (timed beside the uncompiled default)
    or of one post-train size."""
    kind, name = a.child.split(":", 1)
    if kind == "recover":
        spec = next(s for s in p.recover_models if s[0] == name)
        return time_variants(p, spec, COMPILED + [UNCOMPILED], device)
    spec = next(s for s in p.posttrain if s[0] == name)
    return time_posttrain(p, spec, device, POSTTRAIN_COMPILED)["variants"]


def compile_recover(a: argparse.Namespace, p: Plan, rows: dict, device: torch.device, budget: Budget, peak: float,
                    save) -> None:
    """The torch.compile variant of each model, each in a child process bounded by what is left of the
    budget, each saved as it finishes."""
    for spec in p.recover_models:
        row = rows.get(spec[0])
        if row is None:
            continue
        if spec[0] not in p.compile_models:
            row["skipped"].update({v: "not in this plan" for v in COMPILED})
            continue
        rates, why = in_child(a, f"recover:{spec[0]}", budget)
        if rates is None:
            row["skipped"].update({v: why for v in COMPILED})
        else:
            # timed again beside the uncompiled default, alternating: the two are compared in one pass
            rate_row(row, {v: rates[v] for v in COMPILED}, peak)
            for v in COMPILED:
                row["variants"][v]["vs_uncompiled_same_pass"] = round(
                    rates[v]["img_iters_per_s"] / rates[UNCOMPILED]["img_iters_per_s"], 3)
        save()


# --- post-train speed ------------------------------------------------------------------

def encoded(images: torch.Tensor, distinct: int) -> EncodedImages:
    """`images` as PNG bytes; the first `distinct` are encoded and repeated (random pixels: the
    worst case for PNG, and close to recovered images)."""
    png = [encode_png(im) for im in images[:distinct]]
    n = len(images)
    return EncodedImages([pa.array([png[i % distinct] for i in range(n)], pa.large_binary())], np.arange(n),
                         np.zeros(n, dtype=np.int64))


def time_posttrain(p: Plan, spec: tuple, device: torch.device, variants: dict) -> dict:
    """Images / s of train_step (teacher labels the student's crop, CutMix) per variant."""
    name, size, width, batch = spec
    classes = 1000 if size > 64 else 100
    info = DatasetInfo(name, classes, tuple(map(str, range(classes))), size, IMAGENET_MEAN, IMAGENET_STD, False)
    steps = p.posttrain_steps
    g = torch.Generator().manual_seed(0)
    host = torch.randint(0, 256, (batch * (steps + 2), 3, size, size), generator=g, dtype=torch.uint8)
    row: dict = {"image_size": size, "student": f"resnet18 w{width:g}", "teacher": f"resnet18 w{width:g}",
                 "batch": batch, "mix": p.recipe.posttrain.mix, "variants": {}}
    for v, (amp, comp, enc) in variants.items():
        if enc and size <= 64:
            continue  # small sets are decoded up front (dist.posttrain.DECODED_MAX_BYTES)
        cfg = dataclasses.replace(p.recipe.posttrain, student_width=width, batch_size=batch, amp=amp)
        images = encoded(host, batch).to(device) if enc else host.to(device)
        teacher = frozen(create_model("resnet18", classes, width, small_input(size))).to(device)
        tr = PostTrainer(cfg, images, teacher, info, image_size=size, small_input=small_input(size),
                         seed=p.recipe.seed)
        student = torch.compile(tr.student, backend=p.recipe.recover.compile_backend) if comp else tr.student
        batches = epoch_batches(len(host), cfg, size, seed=p.recipe.seed, epoch=0)

        def step(sb, student=student, tr=tr, images=images, cfg=cfg):
            train_step(student, teacher, tr.opt, images, sb, tr.rows, tr.weight, cfg, size, info.mean, info.std)
        warm = timed(lambda: [step(sb) for sb in batches[:2]], device)
        t = timed(lambda: [step(sb) for sb in batches[2:2 + steps]], device)
        row["variants"][v] = {"images_per_s": round(batch * steps / t, 1), "warmup_seconds": round(warm, 2)}
    return row


POSTTRAIN_VARIANTS = {"fp32": ("none", False, False), "bf16": ("bf16", False, False),  # (amp, compile, encoded)
                      "bf16_encoded_png": ("bf16", False, True)}
POSTTRAIN_COMPILED = {"bf16_compile": ("bf16", True, False)}


# --- end to end -------------------------------------------------------------------------

def e2e_data(a: argparse.Namespace, size: int):
    """(train, test) of CIFAR-10 from the Parquet files in `--data-dir` (the package's own reader), or the
    synthetic set in quick mode without them."""
    if has_parquet_layout(os.path.abspath(a.data_dir)):
        return [load_split("cifar10", s, a.data_dir, size) for s in ("train", "test")], "parquet:" + a.data_dir
    if a.quick:
        return [load_split("synthetic", s, None, size) for s in ("train", "test")], "synthetic"
    return None, f"no train-*.parquet / test-*.parquet in {a.data_dir}: copy ../shared/data/cifar10/*.parquet there"


def run_e2e(p: Plan, a: argparse.Namespace, device: torch.device) -> dict:
    """Squeeze (supervised, full width) -> recover IPC k -> post-train -> top-1 on the real test split."""
    size = 32 if not a.quick else 16
    sets, source = e2e_data(a, size)
    if sets is None:
        return {"skipped": source}
    train, test = sets
    info, t = train.info, {}
    t0 = time.perf_counter()
    rc = p.recipe
    sq = dataclasses.replace(rc.squeeze, method="supervised", epochs=p.e2e_squeeze_epochs)
    model = squeeze(train, rc.arch, p.e2e_width, sq, device=device, seed=rc.seed, small_input=True)
    sync(device)
    t["squeeze"] = time.perf_counter() - t0
    teacher_top1 = top1(model, test, info.mean, info.std, device)
    rcfg = dataclasses.replace(rc.recover, iterations=p.e2e_recover_iters, classes_per_batch=info.num_classes,
                               ipc_per_shard=p.e2e_ipc)  # the whole set as one batch
    t0 = time.perf_counter()
    frozen(model)
    shards = [recover_shard(model, s, rcfg, info.mean, info.std, size, rc.seed, device)
              for s in plan_shards(info.num_classes, p.e2e_ipc, rcfg.classes_per_batch, rcfg.ipc_per_shard)]
    t["recover"] = time.perf_counter() - t0
    res_batches = [len(r.images) for r, _, _ in shards]
    synthetic = torch.cat([r.images for r, _, _ in shards])
    idx, _ = sample_per_class(train, p.e2e_ipc, seed=rc.seed)
    pcfg = dataclasses.replace(rc.posttrain, student_width=p.e2e_width, epochs=p.e2e_posttrain_epochs)
    res = {"source": source, "train_images": len(train), "test_images": len(test), "ipc": p.e2e_ipc,
           "squeeze_epochs": p.e2e_squeeze_epochs, "recover_iterations": p.e2e_recover_iters,
           "posttrain_epochs": p.e2e_posttrain_epochs, "width": p.e2e_width, "teacher_top1": round(teacher_top1, 2),
           "recover_batches": res_batches}
    for name, images in (("synthetic", synthetic), ("random_real", train.load(idx))):
        t0 = time.perf_counter()
        tr = PostTrainer(pcfg, images.to(device), model, info, image_size=size, small_input=True, seed=rc.seed)
        tr.fit()
        res[f"{name}_top1"] = round(top1(tr.student, test, info.mean, info.std, device), 2)
        t[f"posttrain_{name}"] = time.perf_counter() - t0
    res["seconds"] = {k: round(v, 1) for k, v in t.items()}
    return res


# --- driver --------------------------------------------------------------------------------

def environment(device: torch.device, quick: bool) -> dict:
    env = {"device": str(device), "quick": quick, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "ray_importable": ray_importable()}
    if device.type == "cuda":
        env.update(name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda, memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["name"] = platform.processor() or platform.machine()
    return env


def ray_importable() -> bool:
    try:
        import ray  # noqa: F401  (deferred: only to record whether this machine has it)
    except ImportError:
        return False
    return True


def table(res: dict) -> str:
    """The checks and the throughputs as aligned text."""
    lines = [f"gpu_check on {res['env']['name']} ({res['env']['device']}, torch {res['env']['torch']})"]
    for part, body in res["correctness"].items():
        for k, v in body.items():
            if isinstance(v, dict) and "pass" in v:
                lines.append(f"  {'ok  ' if v['pass'] else 'FAIL'} {part}.{k}: {v['value']:.3g} (tolerance {v['tolerance']:.3g})")
    if res.get("peak", {}).get("n"):
        lines.append(f"  peak bf16 matmul {res['peak']['n']}^3: {res['peak']['tflops']} TFLOP/s")
    for name, row in res.get("recover", {}).items():
        lines.append(f"  recover {name} batch {row['batch']} ({row['gflops_per_image_iteration']} GFLOP per image-iteration):")
        for v, r in row["variants"].items():
            same = f"  ({r['vs_uncompiled_same_pass']:.2f}x {UNCOMPILED} timed beside it)" if "vs_uncompiled_same_pass" in r else ""
            lines.append(f"    {v:28s} {r['img_iters_per_s']:>10.1f} img x it/s  {r['vs_reference']:>6.2f}x ref  "
                         f"{r['tflops']:>8.3f} TFLOP/s  {100 * r['share_of_peak']:>6.2f}% of peak{same}")
        for v, why in row["skipped"].items():
            lines.append(f"    {v:28s} skipped ({why})")
    for name, row in res.get("posttrain", {}).items():
        rates = ", ".join(f"{v} {r['images_per_s']} img/s" for v, r in row["variants"].items())
        skipped = "".join(f", {v} skipped ({why})" for v, why in row.get("skipped", {}).items())
        lines.append(f"  posttrain {name} batch {row['batch']}: {rates}{skipped}")
    e2e = res.get("e2e", {})
    if "skipped" in e2e:
        lines.append(f"  e2e skipped: {e2e['skipped']}")
    elif e2e:
        lines.append(f"  e2e ({e2e['source']}): teacher {e2e['teacher_top1']}%, IPC {e2e['ipc']} synthetic "
                     f"{e2e['synthetic_top1']}%, random real {e2e['random_real_top1']}%, seconds {e2e['seconds']}")
    for why in res.get("skipped_parts", []):
        lines.append(f"  skipped {why}")
    lines.append(f"  {res['seconds']:.1f} s")
    return "\n".join(lines)


PARTS = ("correctness", "peak", "recover", "posttrain", "e2e")


def plan(a: argparse.Namespace) -> Plan:
    p = QUICK_PLAN if a.quick else GPU_PLAN
    if a.recover_model:
        chosen = models(*a.recover_model)
        p = dataclasses.replace(p, recover_models=chosen, compile_models=tuple(m[0] for m in chosen))
    return dataclasses.replace(p, recover_iters=a.iterations or p.recover_iters, repeats=a.repeats or p.repeats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the code paths in under a minute")
    ap.add_argument("--data-dir", default="data_cache/cifar10", help="CIFAR-10 Parquet files for the e2e part")
    ap.add_argument("--parts", default="correctness,peak,recover,posttrain,e2e")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="seconds after which nothing new starts; each compiled item runs in a child process "
                         "stopped when they are over")
    ap.add_argument("--recover-model", action="append", default=None, metavar="ARCH:WIDTH:SIZE:BATCH",
                    help="time these recover models instead of the plan's (repeatable), all with compile")
    ap.add_argument("--iterations", type=int, default=None, help="recover iterations per timed run")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one compiled item, for `in_child`
    add_recipe_args(ap, "cifar10")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: error: --device cuda but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    fixed = {}
    if device.type == "cpu":
        torch.set_num_threads(a.threads)  # default 1: two threads on a busy small machine can be far slower
        fixed["recover.compile_backend"] = "eager"  # Dynamo's capture of our code; code generation takes minutes
    p, budget = dataclasses.replace(plan(a), recipe=recipe(a, fixed)), Budget(a.budget_s)
    if a.child:
        print("CHILD " + json.dumps(child(a, p, device)), flush=True)
        return 0
    parts = a.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"gpu_check: error: --parts: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PARTS)})",
              file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    res: dict = {"command": shlex.join(["python3", "benchmarks/gpu_check.py", *sys.argv[1:]]),
                 "env": environment(device, a.quick), "plan": dataclasses.asdict(p), "compile_backend":
                 p.recipe.recover.compile_backend, "correctness": {}, "seconds": 0.0}

    def save():
        res["seconds"] = round(a.budget_s - budget.left(), 1)
        with open(os.path.join(a.out, "gpu_check.json.tmp"), "w") as f:
            json.dump(res, f, indent=1)
        os.replace(os.path.join(a.out, "gpu_check.json.tmp"), os.path.join(a.out, "gpu_check.json"))
    if "correctness" in parts:
        res["correctness"] = {"bn_stats": check_bn_stats(device), "losses": check_losses(p, device),
                              "images": check_images(p, device)}
        save()
    peak = {"tflops": math.nan}  # share-of-peak figures are NaN without it
    if "peak" in parts or "recover" in parts:
        peak = res["peak"] = peak_matmul(p, device)
        if device.type == "cuda" and "H100" in res["env"]["name"]:
            peak["h100_reference_tflops"] = H100_BF16_MATMUL_TFLOPS
        save()
    # Past the budget, nothing new starts (a part already running finishes: the device script's own timeout
    # bounds the whole run); what is skipped says so.
    res["skipped_parts"] = []
    if "recover" in parts:
        res["recover"] = {}
        for spec in p.recover_models:
            if budget.left() <= 0:
                res["skipped_parts"].append(f"recover {spec[0]}: time budget")
                continue
            res["recover"][spec[0]] = time_recover_model(p, spec, device, peak["tflops"])
            save()
    if "posttrain" in parts:
        res["posttrain"] = {}
        for spec in p.posttrain:
            if budget.left() <= 0:
                res["skipped_parts"].append(f"posttrain {spec[0]}: time budget")
                continue
            res["posttrain"][spec[0]] = time_posttrain(p, spec, device, POSTTRAIN_VARIANTS)
            save()
    if "e2e" in parts:
        res["e2e"] = run_e2e(p, a, device) if budget.left() > 0 else {"skipped": "time budget"}
        save()
    if "recover" in parts:  # compiling last, each in a child stopped at the budget's end
        compile_recover(a, p, res["recover"], device, budget, peak["tflops"], save)
    if "posttrain" in parts:
        for name, row in res["posttrain"].items():
            variants, why = in_child(a, f"posttrain:{name}", budget)
            if variants is None:
                row["skipped"] = {v: why for v in POSTTRAIN_COMPILED}
            else:
                row["variants"].update(variants)
            save()
    save()
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
