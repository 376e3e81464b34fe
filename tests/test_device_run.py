"""benchmarks/device_run.py, the GPU lease's one command: its Ray bundle step, its steps' commands, and a step
stopped at its deadline keeping what it wrote. (The whole script at toy sizes on CPU: docs/gpu.md.)"""
import argparse
import io
import os
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import device_run  # noqa: E402


def _bundle(path, body="VERSION = 'bundled'\n"):
    with tarfile.open(path, "w:xz") as t:
        data = body.encode()
        info = tarfile.TarInfo("ray/__init__.py")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


def test_ray_is_unpacked_onto_the_path_when_this_python_has_none(tmp_path):
    noray = tmp_path / "noray" / "ray"  # `import ray` fails, as on the GPU machine
    noray.mkdir(parents=True)
    (noray / "__init__.py").write_text("raise ImportError('no ray here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "noray")}
    assert not device_run.ray_importable(env)
    _bundle(tmp_path / "ray.tar.xz")
    done = device_run.unpack_ray(str(tmp_path / "ray.tar.xz"), str(tmp_path / "site"), env)
    assert done["ray"].startswith("unpacked") and env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "site")
    assert device_run.ray_importable(env)
    with pytest.raises(SystemExit, match="--ray-bundle"):  # no Ray and no bundle: one line, before any step
        device_run.unpack_ray(str(tmp_path / "absent.tar.xz"), str(tmp_path / "s2"),
                              {**os.environ, "PYTHONPATH": str(tmp_path / "noray")})


def test_the_gpu_steps_run_the_product_on_one_gpu_at_full_width(tmp_path):
    a = argparse.Namespace(out=str(tmp_path), device="cuda", quick=False, data_dir=str(tmp_path / "cifar10"))
    steps = dict(device_run.steps(a))
    assert list(steps) == ["gpu_check", "distill", "cells"]
    check = steps["gpu_check"]
    assert "--quick" not in check and "e2e" not in check[check.index("--parts") + 1]
    for name in ("distill", "cells"):
        argv = steps[name]
        assert argv[argv.index("--num-gpus") + 1] == "1" and argv[argv.index("--width") + 1] == "1.0"
        assert argv[argv.index("--dataset") + 1] == "cifar10"
    quick = dict(device_run.steps(argparse.Namespace(out=str(tmp_path), device="cpu", quick=True,
                                                     data_dir=str(tmp_path / "none"))))
    assert quick["distill"][quick["distill"].index("--num-gpus") + 1] == "0"
    assert quick["distill"][quick["distill"].index("--dataset") + 1] == "synthetic"
    assert max(device_run.DEADLINES.values()) < 9 * 60 and device_run.DEADLINES["gpu_check"] <= 5 * 60


def test_a_step_is_stopped_at_its_deadline_and_its_log_kept(tmp_path):
    code = "import time; print('started', flush=True); time.sleep(60)"
    res = device_run.run_step("slow", [sys.executable, "-c", code], dict(os.environ), str(tmp_path), timeout=3)
    assert res["rc"] == "stopped at its deadline" and res["seconds"] < 30
    assert "started" in (tmp_path / "slow.log").read_text()
