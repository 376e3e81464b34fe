"""Ray placement as on a GPU machine, on this CPU machine: `distill --num-gpus 2` through a Ray instance with
two declared GPUs (tests/gpu_placement_child.py, in a process of its own: the session's Ray instance has
none), the device compute replaced by the CPU in that test file."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.mark.slow
def test_synthesis_actors_and_train_workers_get_distinct_gpus_after_the_driver_let_go(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_placement_child.py"), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0, res.stderr[-4000:]
    for kind in ("actors", "workers"):  # two of each, one GPU each, not the same one
        ids = [tuple(r["gpu_ids"]) for r in out[kind]]
        assert len(ids) == 2 and all(len(i) == 1 for i in ids) and {i[0] for i in ids} == {"0", "1"}, out[kind]
    # an actor's torch sees its own GPU alone; Ray Train shows each worker both (for NCCL) and picks its own
    assert sorted(r["visible"] for r in out["actors"]) == ["0", "1"]
    assert sorted(r["device"] for r in out["workers"]) == ["cuda:0", "cuda:1"]
    # The driver hands its cached GPU memory back before Ray places anything on the GPUs
    calls = out["calls"]
    assert calls.index("release_gpu") < calls.index("run_ray")
    assert "release_gpu" in calls[calls.index("run_ray") + 1:calls.index("run_posttrain")]
