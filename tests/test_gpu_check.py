"""benchmarks/gpu_check.py, the evidence a GPU session collects, runs here on CPU in quick mode where
`import ray` fails (as on the bare GPU machine), so it cannot rot between GPU runs."""
import argparse
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = os.path.join(os.path.dirname(__file__), "..")


def write_hf_parquet(path, n_per_class, classes=("cat", "dog", "eel"), size=16, seed=0):
    """The Hugging Face image-classification layout of ../shared/data/cifar10: `img` {bytes (JPEG), path}, `label`."""
    rng = np.random.RandomState(seed)
    imgs, labels = [], []
    for c in range(len(classes)):
        for i in range(n_per_class):
            arr = np.clip(np.full((size, size, 3), 60 * c + 40) + rng.randint(-20, 20, (size, size, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG")
            imgs.append({"bytes": buf.getvalue(), "path": f"{c}_{i}.jpg"})
            labels.append(c)
    table = pa.table({"img": imgs, "label": pa.array(labels, pa.int64())})
    pq.write_table(table.replace_schema_metadata({"classes": ",".join(classes)}), path)


def test_gpu_check_quick_on_cpu_without_ray(tmp_path):
    data = tmp_path / "cifar10"
    data.mkdir()
    write_hf_parquet(data / "train-00000-of-00001.parquet", 8)
    write_hf_parquet(data / "test-00000-of-00001.parquet", 4, seed=1)
    noray = tmp_path / "noray" / "ray"  # first on the path: `import ray` fails as on the GPU machine
    noray.mkdir(parents=True)
    (noray / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'noray'}{os.pathsep}."}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out),
                          "--data-dir", str(data)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gpu_check on" in res.stdout and "FAIL" not in res.stdout
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["env"]["device"] == "cpu" and r["env"]["quick"] and not r["env"]["ray_importable"]
    assert r["seconds"] < 120  # compiled items start child processes (~10 s each here)
    checks = [v for part in r["correctness"].values() for v in part.values() if isinstance(v, dict) and "pass" in v]
    assert len(checks) == 10 and all(c["pass"] for c in checks)
    assert r["correctness"]["images"]["iterations"] > 0 and r["peak"]["tflops"] > 0
    assert set(r["recover"]) == {"resnet18-w0.125-16", "resnet50-w0.0625-72", "resnet101-w0.0625-72"}
    for row in r["recover"].values():
        assert row["gflops_per_image_iteration"] > 0
        assert {"fp32_nchw", "fp32_channels_last", "bf16_nchw", "bf16_channels_last", "reference"} <= set(row["variants"])
        assert all(v["img_iters_per_s"] > 0 and v["tflops"] > 0 and 0 < v["share_of_peak"] for v in row["variants"].values())
        assert row["variants"]["reference"]["vs_reference"] == 1.0
    assert "bf16_channels_last_compile" in r["recover"]["resnet18-w0.125-16"]["variants"]  # captured by Dynamo
    for row in r["posttrain"].values():
        assert {"fp32", "bf16", "bf16_compile"} <= set(row["variants"])
    assert "bf16_encoded_png" in r["posttrain"]["imagenet-72"]["variants"]
    e2e = r["e2e"]
    assert e2e["source"].startswith("parquet:") and e2e["train_images"] == 24 and e2e["test_images"] == 12
    assert e2e["recover_batches"] == [3 * 2]  # every class at every IPC index in one recover batch
    assert all(0 <= e2e[k] <= 100 for k in ("teacher_top1", "synthetic_top1", "random_real_top1"))


def _noray(tmp_path):
    noray = tmp_path / "noray" / "ray"
    noray.mkdir(parents=True)
    (noray / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "noray")}  # not the checkout: the script finds it


@pytest.mark.parametrize("part", ["correctness", "peak", "recover", "posttrain", "e2e"])
def test_gpu_check_runs_each_part_alone(tmp_path, part):
    """--parts with one part prints its table (a part left out is left out of the table, not a KeyError)."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, os.path.abspath(os.path.join(ROOT, "benchmarks", "gpu_check.py")),
                          "--device", "cpu", "--quick", "--parts", part, "--out", str(out)],
                         cwd=tmp_path, env=_noray(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    assert not r["env"]["ray_importable"] and "FAIL" not in res.stdout
    assert bool(r["correctness"]) == (part == "correctness")
    assert ("peak" in r) == (part in ("peak", "recover")) and ("recover" in r) == (part == "recover")
    assert ("posttrain" in r) == (part == "posttrain") and ("e2e" in r) == (part == "e2e")
    if part == "e2e":
        assert r["e2e"]["source"] == "synthetic" and r["e2e"]["recover_batches"] == [4 * 2]


def test_gpu_check_runs_under_runpy(tmp_path):
    out = tmp_path / "out"
    code = ("import runpy, sys; sys.argv = ['gpu_check', '--device', 'cpu', '--quick', '--parts', 'peak', '--out', "
            f"{str(out)!r}]; runpy.run_path({os.path.join(ROOT, 'benchmarks', 'gpu_check.py')!r}, "
            "run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_noray(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "gpu_check.json").read_text())["peak"]["tflops"] > 0


def test_a_compiled_item_never_runs_past_the_budget(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    asked = []

    def run(argv, timeout, **kw):
        asked.append((argv, timeout))
        raise subprocess.TimeoutExpired(argv, timeout)
    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    budget = gpu_check.Budget(100.0)
    rates, why = gpu_check.in_child(argparse.Namespace(), "recover:resnet50-w1-224", budget)
    assert rates is None and why.startswith("time budget: stopped after")
    (argv, timeout), = asked
    assert argv[-2:] == ["--child", "recover:resnet50-w1-224"] and 90 < timeout <= 100.0
    assert gpu_check.in_child(argparse.Namespace(), "recover:x", gpu_check.Budget(gpu_check.MIN_CHILD_S - 1)) \
        == (None, "time budget") and len(asked) == 1  # too little left: not started at all
