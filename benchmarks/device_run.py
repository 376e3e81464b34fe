"""The one command a GPU lease runs: Ray from an offline bundle, gpu_check, a real distill through Ray, then
CIFAR-10 ranking cells while time is left; everything under one output folder as it goes.

    # on the GPU machine (a bare Python 3.12 with torch; data_cache/ carried: ray.tar.xz + cifar10/*.parquet)
    python3 benchmarks/device_run.py --out $OUT/device_run            # under 9 minutes on one H200 (estimate)
    # here, the same steps at toy sizes on CPU
    python3 benchmarks/device_run.py --device cpu --quick --out /tmp/device_run

Steps, each a child process with its own deadline (seconds from the start; a step still running at its
deadline is stopped, and what it wrote stays):

  ray        if `import ray` fails: unpack --ray-bundle (made by pack-ray-offline) into --ray-dir, put it
             on PYTHONPATH for every later step (Ray's worker processes inherit it)
  gpu_check  benchmarks/gpu_check.py without its e2e part (the distill below is the end-to-end run), its
             budget ending at the gpu_check deadline (minute 5)
  distill    scdd-ray distill --dataset cifar10 --num-gpus 1 at full width through Ray actors and Ray
             Train, with a reduced budget (REDUCED below); deadline minute 8
  cells      scdd-ray bench table: random and scdd at IPC 10 on CIFAR-10 at full width, sharing the
             distill's cached models, until minute 8.8

OUT/device_run.json says after every step what ran, its exit status and seconds; OUT/<step>.log holds its
output, written as it runs. --quick (CPU) uses tiny widths and epochs and the synthetic dataset unless
--data-dir holds CIFAR-10's Parquet files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Deadlines in seconds from the start, on a GPU: gpu_check ends by minute 5, all by minute 9.
DEADLINES = {"ray": 60.0, "gpu_check": 300.0, "distill": 480.0, "cells": 530.0}
QUICK_DEADLINES = {"ray": 120.0, "gpu_check": 300.0, "distill": 1200.0, "cells": 1500.0}  # a shared CPU: generous
TERM_GRACE_S = 8.0  # a stopped step's time to shut Ray down before it is killed
GPU_CHECK_MARGIN_S = 20.0  # gpu_check's own budget ends this long before its deadline (writing, exiting)

# The distill's reduced budget on a GPU (the cifar10 GPU preset otherwise: full-width ResNet-18,
# squeeze 200 SSL epochs, IPC 50, recover 1000 iterations, post-train 200 epochs).
REDUCED = ["--width", "1.0", "--squeeze-epochs", "4", "--squeeze-probe-epochs", "10", "--recover-iterations", "500",
           "--posttrain-epochs", "100"]
QUICK = ["--width", "0.125", "--squeeze-epochs", "1", "--squeeze-probe-epochs", "1", "--recover-iterations", "5",
         "--posttrain-epochs", "2", "--posttrain-student-width", "0.125"]
# The ranking cells: random real images and scdd at IPC 10, one seed, no hard-label (HLR) students.
CELLS = ["--methods", "random,scdd", "--seeds", "0", "--model-seed", "0", "--no-hlr"]


def ray_importable(env: dict) -> bool:
    r = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True)
    return r.returncode == 0


def unpack_ray(bundle: str, dest: str, env: dict) -> dict:
    """Ray from the offline bundle on PYTHONPATH (when this Python has none); returns what was done."""
    if ray_importable(env):
        return {"ray": "already importable"}
    if not os.path.isfile(bundle):
        raise SystemExit(f"device_run: error: --ray-bundle: {bundle} does not exist and this Python has no Ray "
                         "(make it with ../shared/tools/pack-ray-offline data_cache/ray.tar.xz)")
    if not os.path.isdir(os.path.join(dest, "ray")):
        os.makedirs(dest, exist_ok=True)
        with tarfile.open(bundle, "r:xz") as t:
            t.extractall(dest, filter="tar")  # the bundle's own executables keep their mode bits
    env["PYTHONPATH"] = os.pathsep.join(p for p in (dest, env.get("PYTHONPATH")) if p)
    if not ray_importable(env):
        raise SystemExit(f"device_run: error: Ray unpacked into {dest} still does not import")
    return {"ray": f"unpacked {bundle} into {dest}"}


def steps(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, argv) of every step after the Ray one."""
    py = sys.executable
    cli = [py, "-m", "scdd_ray.cli"]
    data = os.path.abspath(a.data_dir)
    have_cifar = os.path.isdir(data) and any(f.startswith("train-") for f in os.listdir(data))
    dataset = ["--dataset", "cifar10", "--data-dir", data] if have_cifar or not a.quick else ["--dataset", "synthetic"]
    models = ["--models-dir", os.path.join(a.out, "models")]
    gpus = ["--num-gpus", "0" if a.device == "cpu" else "1"]
    sizes = QUICK if a.quick else REDUCED
    check = [py, os.path.join(HERE, "gpu_check.py"), "--device", a.device, "--out", os.path.join(a.out, "gpu_check"),
             "--parts", "correctness,peak,recover,posttrain", "--budget-s", "{budget}"] + (["--quick"] if a.quick else [])
    ipc = "1" if a.quick else "10"
    distill = cli + ["distill", *dataset, *gpus, *models, "--out", os.path.join(a.out, "distill"), "--ipc", ipc,
                     *sizes]
    cells = cli + ["bench", "table", *dataset, *gpus, *models, "--work", os.path.join(a.out, "cells"),
                   "--json", os.path.join(a.out, "cells", "table.json"), "--ipcs", ipc, *CELLS, *sizes]
    return [("gpu_check", check), ("distill", distill), ("cells", cells)]


def run_step(name: str, argv: list[str], env: dict, out: str, timeout: float) -> dict:
    """One step, its output streamed to OUT/<name>.log, stopped at `timeout` seconds: SIGTERM to its whole
    process group (our commands shut Ray down on it, as on Ctrl-C), then SIGKILL to what is left after
    TERM_GRACE_S, so that no process of a stopped step holds the GPU into the next one."""
    log = os.path.join(out, f"{name}.log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "stopped at its deadline"
            for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    if sig == signal.SIGTERM:
                        os.killpg(p.pid, signal.SIGKILL)  # what the step started and left behind
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": os.path.basename(log)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ["OUT"], "device_run") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out, required=default_out is None, help="output folder [$OUT/device_run]")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes (with --device cpu: the whole script in minutes)")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "data_cache", "cifar10"),
                    help="CIFAR-10 Parquet files [data_cache/cifar10]")
    ap.add_argument("--ray-bundle", default=os.path.join(ROOT, "data_cache", "ray.tar.xz"),
                    help="pack-ray-offline's archive, unpacked when this Python has no Ray [data_cache/ray.tar.xz]")
    ap.add_argument("--ray-dir", default=os.path.join("/tmp", "scdd-raysite"), help="where the bundle is unpacked")
    ap.add_argument("--steps", default="gpu_check,distill,cells", help="which steps after the Ray one")
    a = ap.parse_args()
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    deadlines = QUICK_DEADLINES if a.quick else DEADLINES
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}
    status: dict = {"command": shlex.join(["python3", "benchmarks/device_run.py", *sys.argv[1:]]),
                    "device": a.device, "quick": a.quick, "python": platform.python_version(),
                    "deadlines_s": deadlines, "steps": {}}

    def save():
        status["seconds"] = round(time.perf_counter() - t0, 1)
        tmp = os.path.join(a.out, "device_run.json.tmp")
        with open(tmp, "w") as f:
            json.dump(status, f, indent=1)
        os.replace(tmp, os.path.join(a.out, "device_run.json"))

    t = time.perf_counter()
    status["steps"]["ray"] = {**unpack_ray(a.ray_bundle, a.ray_dir, env), "seconds": round(time.perf_counter() - t, 1)}
    save()
    chosen = a.steps.split(",")
    for name, argv in steps(a):
        if name not in chosen:
            continue
        left = deadlines[name] - (time.perf_counter() - t0)
        if left < 10:
            status["steps"][name] = {"rc": "skipped: its deadline had passed"}
            save()
            continue
        argv = [x.replace("{budget}", f"{max(left - GPU_CHECK_MARGIN_S, 10):.0f}") for x in argv]
        status["steps"][name] = {"rc": "running", "deadline_s": deadlines[name]}
        save()
        status["steps"][name] = run_step(name, argv, env, a.out, left)
        save()
        print(f"device_run: {name}: {status['steps'][name]}", flush=True)
    save()
    print(f"device_run: {status['seconds']} s; {os.path.join(a.out, 'device_run.json')}")
    return 0 if all(s.get("rc", 0) == 0 for k, s in status["steps"].items() if k != "ray") else 1


if __name__ == "__main__":
    sys.exit(main())
