"""Peak host memory (RSS) of one post-train worker on an ImageNet-shaped distilled set.

Writes (once) a synthetic distilled set of `--classes` x `--ipc` images at
`--image-size` with our own store (one shard per IPC index and block of 50
classes, as `distill` writes them). The images are 7x7 grids of flat colour
blocks: low-frequency and very compressible (about 1 KB of PNG each at 224),
so the set stays small on disk; recovered images are noisier and take more.

Then, in a fresh process per mode, does what a Ray Train worker does
(`dist.posttrain.read_images`, then `core.posttrain.PostTrainer`) for `--steps`
steps and reports that process's peak RSS:
  encoded: the set kept as PNG bytes, each batch decoded on demand (the default for large sets);
  decoded: the whole set decoded up front (what every worker did before).
It also reports PNG bytes per image for these blocks, for uniform noise and
for images recovered by the production step, since the worker keeps the PNG bytes.
Image size, IPC, post-train and recover settings are the imagefolder preset's
(ImageNet-1K), with `--set` overrides; the committed measurements used a
ResNet-18 of width 0.25 (`--set posttrain.student_width=0.25`).

    python benchmarks/posttrain_memory.py --dir /tmp/in1k-shaped --set posttrain.student_width=0.25 \
        --json benchmarks/results/in1k_posttrain_memory.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from scdd_ray.core.posttrain import PostTrainer
from scdd_ray.core.recover import synthesize
from scdd_ray.core.shards import plan_shards
from scdd_ray.data import DatasetInfo
from scdd_ray.models.factory import create_model, small_input
from scdd_ray.models.runtime import frozen
from scdd_ray.store.distilled import read_encoded
from scdd_ray.store.png import encode_png
from scdd_ray.store.shards import ShardStore

from _recipe import add_recipe_args, recipe


def write_set(root: str, classes: int, ipc: int, size: int) -> None:
    store = ShardStore(root)
    store.open(f"memory-bench-{classes}x{ipc}x{size}")
    done = store.done()
    g = torch.Generator().manual_seed(0)
    for shard in plan_shards(classes, ipc, 50):
        coarse = torch.rand(len(shard), 3, 7, 7, generator=g)  # drawn for every shard: reruns stay identical
        if shard.id in done:
            continue
        images = (F.interpolate(coarse, size=(size, size), mode="nearest") * 255).round().to(torch.uint8)
        store.write_shard(shard.id, list(shard.classes), [shard.ipc_index] * len(shard), images)


PNG_RECOVER_ITERATIONS = 100  # recover iterations of the images whose PNG size is reported


def png_bytes(rc) -> dict:
    """Mean PNG bytes per image of recipe `rc`'s size: our blocks, uniform noise, and images recovered by the
    production step (a ResNet-18 of the student's width, random weights, `rc`'s recover settings)."""
    size, classes = rc.image_size, 1000
    g = torch.Generator().manual_seed(rc.seed)
    blocks = (F.interpolate(torch.rand(4, 3, 7, 7, generator=g), size=(size, size), mode="nearest") * 255)
    noise = torch.randint(0, 256, (4, 3, size, size), generator=g, dtype=torch.uint8)
    torch.manual_seed(rc.seed)
    model = frozen(create_model("resnet18", classes, rc.posttrain.student_width, small_input(size)))
    model = model.to(memory_format=torch.channels_last)
    cfg = dataclasses.replace(rc.recover, iterations=PNG_RECOVER_ITERATIONS)
    recovered = synthesize(model, torch.arange(4), cfg, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), size,
                           seed=rc.seed)
    mean = lambda x: round(sum(len(encode_png(i)) for i in x) / len(x))  # noqa: E731
    return {"blocks": mean(blocks.round().to(torch.uint8)), "uniform_noise": mean(noise),
            f"recovered_{PNG_RECOVER_ITERATIONS}_iterations": mean(recovered.images)}


def measure(a: argparse.Namespace) -> dict:
    """One worker's life: read (and check) the set as `_read_images` does, then train `a.steps` steps."""
    from scdd_ray.dist.posttrain import read_images  # the worker's own reader (imports Ray, which stays idle)

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    images, _ = read_images(a.dir, a.digest, 0, "cpu", keep_encoded=a.mode == "encoded")
    read_s = time.perf_counter() - t0
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc = recipe(a)
    info = DatasetInfo("imagenet-shaped", a.classes, tuple(map(str, range(a.classes))), rc.image_size,
                       (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False)
    cfg = rc.posttrain
    teacher = frozen(create_model(cfg.student, a.classes, cfg.student_width, rc.small_input))
    trainer = PostTrainer(cfg, images, teacher, info, image_size=rc.image_size, small_input=rc.small_input,
                          seed=rc.seed)
    steps = []
    t1 = time.perf_counter()

    class Enough(Exception):
        pass

    def on_step(epoch, s, sb, target):
        steps.append(time.perf_counter() - t1)
        if len(steps) >= a.steps:
            raise Enough

    try:
        trainer.fit(on_step=on_step)
    except Enough:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": a.mode, "kept": type(images).__name__, "images": len(images), "steps": len(steps),
            "step_seconds": [round(b - a_, 2) for a_, b in zip([0.0] + steps, steps)],
            "read_and_check_seconds": round(read_s, 1), "peak_rss_gib_before_read": round(rss_start / 2**20, 3),
            "peak_rss_gib_after_read": round(rss_read / 2**20, 3), "peak_rss_gib": round(kib / 2**20, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="where the synthetic distilled set is (or is written)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--modes", default="encoded", help="comma-separated: encoded, decoded")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    add_recipe_args(ap, "imagefolder")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # internal: measure one mode in this process
    ap.add_argument("--digest", help=argparse.SUPPRESS)  # internal: the driver's digest of the set
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(measure(a)))
        return 0
    torch.set_num_threads(a.threads)
    rc = recipe(a)
    t0 = time.perf_counter()
    write_set(a.dir, a.classes, rc.ipc, rc.image_size)
    disk = sum(os.path.getsize(f) for f in ShardStore(a.dir).files())
    digest = read_encoded(a.dir).digest()  # what the driver computes, here outside the measured process
    p = rc.posttrain
    res = {"benchmark": "posttrain_memory", "command": "python benchmarks/posttrain_memory.py " + " ".join(sys.argv[1:]),
           "classes": a.classes, "ipc": rc.ipc, "image_size": rc.image_size,
           "decoded_gib": round(a.classes * rc.ipc * 3 * rc.image_size ** 2 / 2**30, 2),
           "parquet_mib": round(disk / 2**20, 1), "write_seconds": round(time.perf_counter() - t0, 1),
           "batch": p.batch_size, "student": f"{p.student} w{p.student_width:g}",
           "teacher": f"{p.student} w{p.student_width:g}", "threads": a.threads, "torch": torch.__version__,
           "png_bytes_per_image": png_bytes(rc),
           "results": []}
    for mode in a.modes.split(","):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--digest", digest], capture_output=True,
                             text=True, check=True)
        res["results"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(res["results"][-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
