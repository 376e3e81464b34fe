"""Tune sweeps: YAML validation, an objective that cannot see the test split, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from scdd_ray.config import ConfigError
from scdd_ray.tune_config import load_tune_config, read_tune_config

from test_cli_errors import run_err

TINY = {
    "name": "tiny", "dataset": "synthetic", "image_size": 16, "width": 0.125, "ipc": 1, "seed": 0,
    "archs": ["resnet18"], "methods": ["scdd", "sre2l"],
    "squeeze": {"epochs": 1, "probe_epochs": 5}, "recover": {"iterations": 3}, "posttrain": {"epochs": 4},
    "search": {"bn_coef": {"loguniform": [0.01, 1.0]}, "first_multiplier": {"choice": [1, 10]}},
    "scheduler": {"name": "fifo"}, "eval_every": 2, "resources": {"cpu": 1}, "num_samples": 1,
    "max_concurrent": 1,
}


def test_shipped_configs_are_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "tune_configs")
    names = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
    assert {"digits_cpu.yaml", "cifar100_gpu.yaml", "imagenet_gpu.yaml"} <= set(names)
    for n in names:
        cfg = read_tune_config(os.path.join(root, n))
        assert cfg.archs and cfg.search
    gpu = read_tune_config(os.path.join(root, "cifar100_gpu.yaml"))
    assert gpu.archs == ("resnet18", "resnet50", "resnet101") and 0 < gpu.resources.gpu <= 1


@pytest.mark.parametrize("patch,key", [
    ({"bogus": 1}, "bogus"),
    ({"search": {"bn_coef": {"loguniform": [0.0, 1.0]}}}, "search.bn_coef"),
    ({"search": {"bn_coef": {"uniform": [2.0, 1.0]}}}, "search.bn_coef"),
    ({"search": {"bn_coef": {"normal": [0, 1]}}}, "search.bn_coef"),
    ({"search": {"momentum": {"choice": [0.9]}}}, "search.momentum"),
    ({"search": {"bn_weights": {"choice": ["first:10", "1,-2"]}}}, "search.bn_weights"),
    ({"search": {"bn_normalize": {"choice": ["none", "depth"]}}}, "search.bn_normalize"),
    ({"recover": {"iteratons": 5}}, "recover.iteratons"),
    ({"posttrain": {"epochs": 0}}, "posttrain.epochs"),
    ({"scheduler": {"name": "pbt"}}, "scheduler.name"),
    ({"scheduler": {"name": "asha", "grace_period": 99}}, "scheduler.grace_period"),
    ({"resources": {"gpu": -1}}, "resources.gpu"),
    ({"resources": {"tpu": 1}}, "resources.tpu"),
    ({"archs": ["vgg11"]}, "archs"),
    ({"methods": ["random"]}, "methods"),
    ({"num_samples": 0}, "num_samples"),
    ({"backbones": {"scdd/resnet50": "x.pt"}}, "backbones.scdd/resnet50"),
])
def test_bad_configs_name_the_key(patch, key):
    with pytest.raises(ConfigError) as e:
        load_tune_config({**TINY, **patch})
    assert str(e.value).startswith(key), str(e.value)


def test_cli_reports_bad_yaml_in_one_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**TINY, "search": {"lr": {"loguniform": [-1, 1]}}}))
    line = run_err(capsys, ["tune", "--config", str(p), "--out", str(tmp_path / "out")])
    assert "search.lr" in line and "loguniform" in line
    assert not (tmp_path / "out").exists()
    line = run_err(capsys, ["tune", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "out")])
    assert "--config" in line and "does not exist" in line
    p.write_text(yaml.safe_dump(TINY))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    line = run_err(capsys, ["tune", "--config", str(p), "--out", str(tmp_path / "mine")])
    assert "--out" in line and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_objective_never_reads_the_test_split(monkeypatch, tmp_path):
    """A trial's only data are val (its score) and train-noval; loading the test split fails the test."""
    # Every module that reads data is imported before the patch: a first import under it would bind the guard
    # for good.
    from scdd_ray import data
    from scdd_ray.core.evaluation import top1
    from scdd_ray.dist import tune
    from scdd_ray.models import create_model

    cfg = load_tune_config(TINY)
    val = data.load_split("synthetic", "val", None, 16)
    train = data.load_split("synthetic", "train-noval", None, 16)
    seen = {x.numpy().tobytes() for x in train.images}
    assert len(val) > 0 and not any(x.numpy().tobytes() in seen for x in val.images)  # val is held out

    def guarded(name, split, *a, **k):
        assert split != "test", "a trial read the test split"
        return real(name, split, *a, **k)

    real = data.load_split
    monkeypatch.setattr(data, "load_split", guarded)
    monkeypatch.setattr(tune, "load_split", guarded)
    backbones = {}
    for method in cfg.methods:
        path = tune.backbone_path(str(tmp_path), cfg, method, "resnet18")
        tune._squeeze_one(cfg, method, "resnet18", path, 1)
        backbones[(method, "resnet18")] = tune.load_checkpoint(path)
    reports = []

    class Ckpt:
        @staticmethod
        def from_directory(d):
            return torch.load(os.path.join(d, tune.STATE_FILE), weights_only=False)

    tune.run_trial({"arch": "resnet18", "method": "scdd", "bn_coef": 0.1, "first_multiplier": 10}, cfg, backbones,
                   val, train, lambda m, checkpoint=None: reports.append((m, checkpoint)), Ckpt)
    assert [m["epoch"] for m, _ in reports] == [2, 4]
    final, state = reports[-1]
    student = create_model("resnet18", val.info.num_classes, cfg.posttrain.student_width)
    student.load_state_dict(state["student"])
    # The reported score is the final student's top-1 on exactly the validation images.
    assert final["val_top1"] == pytest.approx(top1(student, val, val.info.mean, val.info.std))
    assert state["recover"]["bn_weights"] == "first:10" and state["recover"]["bn_coef"] == 0.1


def _finished(exp_dir, epochs):
    """trial dir -> number of final-epoch results recorded in its result.json."""
    out = {}
    if not os.path.isdir(exp_dir):
        return out
    for d in os.listdir(exp_dir):
        f = os.path.join(exp_dir, d, "result.json")
        if os.path.isfile(f):
            with open(f) as fh:
                rows = [json.loads(x) for x in fh if x.strip()]
            out[d] = sum(r.get("epoch") == epochs for r in rows)
    return out


def test_interrupted_sweep_resumes_instead_of_starting_over(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    # 4 trials, one at a time, each long enough (a few seconds) that Ctrl-C lands mid-sweep
    epochs = 150
    cfg_path.write_text(yaml.safe_dump({**TINY, "num_samples": 2, "posttrain": {"epochs": epochs},
                                        "eval_every": 50, "recover": {"iterations": 30}}))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "scdd_ray", "tune", "--config", str(cfg_path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and sum(_finished(out / "tune", epochs).values()) < 1:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C mid-sweep: Tune saves its experiment state
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {d for d, n in _finished(out / "tune", epochs).items() if n}
    assert 1 <= len(done_before) < 4, done_before
    assert not (out / "best.json").exists()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=400)
    after = _finished(out / "tune", epochs)
    assert sum(1 for n in after.values() if n) == 4
    for d in done_before:  # trials finished before the interrupt were not run again
        assert after[d] == 1, d
    best = json.loads((out / "best.json").read_text())
    assert set(best["best"]) == {"resnet18/scdd", "resnet18/sre2l"}
    assert (out / "summary.md").read_text().count("| resnet18 |") == 2


def test_asha_ranks_trials_only_within_their_cell():
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from scdd_ray.dist.tune import PerCellASHA

    def trials():
        return [SimpleNamespace(trial_id=f"t{i}", config={"arch": arch, "method": "scdd"}, status="RUNNING")
                for i, arch in enumerate(("resnet18", "resnet18", "resnet50"))]

    def decisions(sched):
        sched.set_search_properties("val_top1", "max")
        ts = trials()
        for t in ts:
            sched.on_trial_add(None, t)
        return [sched.on_trial_result(None, t, {"epoch": 10, "val_top1": v}) for t, v in zip(ts, (90, 95, 50))]

    # One ASHA for the whole sweep stops the only ResNet-50 trial for being worse than ResNet-18 ones...
    assert decisions(ASHAScheduler(time_attr="epoch", max_t=40, grace_period=10, reduction_factor=2))[2] == \
        TrialScheduler.STOP
    # ...per-cell ASHA compares it with its own cell only: it goes on.
    assert decisions(PerCellASHA(40, 10, 2))[2] == TrialScheduler.CONTINUE
