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
from test_cli_errors import run_err

from scdd_ray.errors import ConfigError
from scdd_ray.models.checkpoint import load_checkpoint
from scdd_ray.tune_config import load_tune_config, read_tune_config

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
    ({"search": {"bn_smoothing": {"uniform": [0.5, 1.0]}}}, "search.bn_smoothing"),
    ({"search": {"class_bn_form": {"choice": ["class", "edc"]}}}, "search.class_bn_form"),
    # a pool chooses real starting images: with noise starting images it is refused, naming the key
    ({"search": {"init_pool": {"choice": [0, 20]}}}, "search.init_pool"),
    # each value is valid alone, but 2x2 patches of ipc 2 need a pool of 8 images per class
    ({"ipc": 2, "recover": {"iterations": 3, "init": "real"},
      "search": {"init_pool": {"choice": [4, 20]}, "init_patches": {"choice": [1, 2]}}}, "search.init_pool"),
])
def test_bad_configs_name_the_key(patch, key):
    with pytest.raises(ConfigError) as e:
        load_tune_config({**TINY, **patch})
    assert str(e.value).startswith(key), str(e.value)


def test_levers_are_searchable_when_every_combination_is_valid():
    """The SRe2L family's recover levers (docs/levers.md) are searched like the paper's settings, and each
    trial's recover config is the base with its sample."""
    from scdd_ray.tune_config import recover_for

    cfg = load_tune_config({**TINY, "ipc": 2, "recover": {"iterations": 3, "init": "real"}, "search": {
        "class_bn_coef": {"loguniform": [0.001, 0.1]}, "class_bn_form": {"choice": ["class", "soft"]},
        "bn_smoothing": {"uniform": [0.0, 0.9]}, "init_pool": {"choice": [8, 20]},
        "init_crops": {"choice": [0, 5]}, "init_patches": {"choice": [1, 2]}}})
    assert set(cfg.search) == {"class_bn_coef", "class_bn_form", "bn_smoothing", "init_pool", "init_crops",
                               "init_patches"}
    r = recover_for(cfg.base.recover, {"init_pool": 8, "init_patches": 2, "bn_smoothing": 0.8})
    assert (r.init, r.init_pool, r.init_patches, r.bn_smoothing, r.iterations) == ("real", 8, 2, 0.8, 3)


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
    from scdd_ray.backbones import resolve_models
    from scdd_ray.core.evaluation import top1
    from scdd_ray.dist import tune
    from scdd_ray.models.factory import create_model

    cfg = load_tune_config(TINY)
    cell = cfg.cell("resnet18", "scdd", str(tmp_path))
    val, train = cell.split("test"), cell.split("train")  # a sweep holds out: these are val and train-noval
    seen = {x.numpy().tobytes() for x in train.images}
    assert len(val) > 0 and not any(x.numpy().tobytes() in seen for x in val.images)  # val is held out
    models = resolve_models(cell, val.info, torch.device("cpu"))  # the cell's SSL backbone and supervised teacher
    assert models.teacher.method == "supervised" and models.backbone.method == "simclr"

    def guarded(name, split, *a, **k):
        assert split != "test", "a trial read the test split"
        return real(name, split, *a, **k)

    real = data.load_split
    monkeypatch.setattr(data, "load_split", guarded)
    reports = []
    monkeypatch.setattr(tune.tune, "report", lambda m, checkpoint=None: reports.append((m, checkpoint)))
    monkeypatch.setattr(tune.tune.Checkpoint, "from_directory",
                        staticmethod(lambda d: torch.load(os.path.join(d, tune.STATE_FILE), weights_only=False)))
    tune.trial({"bn_coef": 0.1, "first_multiplier": 10}, cfg, cell, models.backbone, models.teacher, val, train)
    assert [m["epoch"] for m, _ in reports] == [2, 4]
    final, state = reports[-1]
    student = create_model("resnet18", val.info.num_classes, cell.posttrain.student_width)
    student.load_state_dict(state["student"])
    # The reported score is the final student's top-1 on exactly the validation images.
    assert final["val_top1"] == pytest.approx(top1(student, val, val.info.mean, val.info.std))
    assert state["recover"]["bn_weights"] == "first:10" and state["recover"]["bn_coef"] == 0.1


def _finished(tune_dir, epochs):
    """cell/trial dir -> number of final-epoch results recorded in its result.json (one Tuner per cell)."""
    out = {}
    if not os.path.isdir(tune_dir):
        return out
    for cell in os.listdir(tune_dir):
        for d in os.listdir(os.path.join(tune_dir, cell)) if os.path.isdir(os.path.join(tune_dir, cell)) else ():
            f = os.path.join(tune_dir, cell, d, "result.json")
            if os.path.isfile(f):
                with open(f) as fh:
                    rows = [json.loads(x) for x in fh if x.strip()]
                out[f"{cell}/{d}"] = sum(r.get("epoch") == epochs for r in rows)
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
    # one Tuner (and scheduler) per cell, and one supervised teacher relabels both cells, as in `distill`
    assert sorted(os.listdir(out / "tune")) == ["resnet18-scdd", "resnet18-sre2l"]
    scdd, sre2l = best["best"]["resnet18/scdd"], best["best"]["resnet18/sre2l"]
    assert scdd["teacher"] == sre2l["teacher"] == sre2l["backbone"] != scdd["backbone"]
    assert load_checkpoint(scdd["teacher"]).method == "supervised"
    # the search is seeded by the run seed: both cells tried the same settings, the interrupted one included
    assert _tried(out / "tune" / "resnet18-scdd") == _tried(out / "tune" / "resnet18-sre2l")
    assert len(_tried(out / "tune" / "resnet18-scdd")) == 2


def _tried(cell_dir):
    """The settings a cell's trials ran with (each trial folder's params.json), sorted."""
    out = []
    for d in os.listdir(cell_dir):
        f = os.path.join(cell_dir, d, "params.json")
        if os.path.isfile(f):
            with open(f) as fh:
                out.append(json.dumps(json.load(fh), sort_keys=True))
    return sorted(out)


def test_archs_flag_sweeps_other_archs_than_the_files(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**TINY, "archs": ["resnet18", "resnet50"],
                                 "backbones": {"scdd/resnet18": "a.pt", "scdd/resnet50": "b.pt"}}))
    assert read_tune_config(str(p)).archs == ("resnet18", "resnet50")
    cfg = read_tune_config(str(p), sweep={"archs": ("resnet50",)})
    assert cfg.archs == ("resnet50",) and cfg.backbones == {"scdd/resnet50": "b.pt"}
    assert read_tune_config(str(p), sweep={"archs": ("resnet101",)}).backbones == {}
    line = run_err(capsys, ["tune", "--config", str(p), "--archs", "resnet7", "--out", str(tmp_path / "out")])
    assert line.startswith("scdd-ray: error: --archs: ") and "resnet7" in line
    assert not (tmp_path / "out").exists()


def test_methods_and_max_concurrent_flags_over_the_files(tmp_path, capsys):
    """One method's cells at a time, one trial at a time, from the committed file (no edited copy): the file's
    backbones for the other methods drop; unset flags keep the file's values."""
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**TINY, "methods": ["scdd", "sre2l"], "max_concurrent": 2,
                                 "backbones": {"scdd/resnet18": "a.pt", "sre2l/resnet18": "b.pt"}}))
    whole = read_tune_config(str(p), sweep={"archs": None, "methods": None, "max_concurrent": None})
    assert whole.methods == ("scdd", "sre2l") and whole.max_concurrent == 2 and len(whole.backbones) == 2
    cfg = read_tune_config(str(p), sweep={"methods": ("sre2l",), "max_concurrent": 1})
    assert cfg.methods == ("sre2l",) and cfg.max_concurrent == 1 and cfg.backbones == {"sre2l/resnet18": "b.pt"}
    out = str(tmp_path / "out")
    line = run_err(capsys, ["tune", "--config", str(p), "--methods", "sre2l,scd", "--out", out])
    assert line.startswith("scdd-ray: error: --methods: ") and "scd" in line
    line = run_err(capsys, ["tune", "--config", str(p), "--max-concurrent", "-1", "--out", out])
    assert line == "scdd-ray: error: --max-concurrent: must be a non-negative integer (got -1)"
    assert not (tmp_path / "out").exists()
