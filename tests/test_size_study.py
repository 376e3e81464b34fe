"""benchmarks/size_study.py: rows of the model-size study from cell reports (IOR paired by seed), the sweep's
settings per cell, and the figure."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import size_study  # noqa: E402

from scdd_ray.models.checkpoint import save_checkpoint  # noqa: E402
from scdd_ray.models.factory import create_model  # noqa: E402


def _report(top1, backbone=None, recover_seconds=50.0):
    return {"top1": top1, "teacher": "t.pt", "teacher_top1": 68.5, "evaluated_on": "val", "num_images": 100,
            "config": {"recover": {"iterations": 200, "bn_coef": 0.01, "bn_weights": "first:10"}},
            "recover_seconds": recover_seconds,
            "posttrain_seconds": 120.0, "backbone": backbone, "backbone_method": "simclr"}


def test_rows_pair_ior_by_seed_and_carry_costs(tmp_path):
    bb = tmp_path / "bb.pt"
    save_checkpoint(str(bb), create_model("resnet18", 4, 0.125), arch="resnet18", width=0.125, num_classes=4,
                    image_size=16, small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3, method="simclr",
                    meta={"seconds": 1608.0, "test_top1": 51.3})
    random = {0: _report(35.0), 1: _report(33.0), 2: _report(34.0)}
    reports = {0: _report(25.0, str(bb)), 1: _report(24.0, str(bb)), 2: _report(26.0, str(bb), 70.0)}
    r = size_study.row("resnet50", "scdd", reports, random, {"recover.bn_coef": 0.01})
    assert r["ior"]["values"] == [-10.0, -9.0, -8.0] and r["ior"]["mean"] == pytest.approx(-9.0)
    assert r["top1"]["mean"] == pytest.approx(25.0) and r["teacher"] == "t.pt" and r["chosen_by_sweep"]
    assert r["squeeze_seconds"] == 1608.0 and r["backbone_val_top1"] == 51.3
    assert r["recover_img_iters_per_s"] == round(100 * 200 / ((50 + 50 + 70) / 3), 2)
    rows = [size_study.row("-", "random", random, random, {}), r,
            {**r, "method": "sre2l", "top1": {"mean": 27.0, "std": 1.0, "values": [27.0]}}]
    size_study.plot({"rows": rows, "dataset": "cifar10", "ipc": 10, "seeds": [0, 1, 2]}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    page = size_study.markdown({"rows": rows, "dataset": "cifar10", "ipc": 10, "seeds": [0, 1, 2],
                                "command": "python size_study.py x",
                                "commit": "abc", "machine": {"arch": "x86_64", "cpu_count": 2, "gpus": []},
                                "train_noval": True,
                                "missing": [{"arch": "resnet101", "method": "scdd", "why": "not squeezed"}]})
    lines = page.splitlines()
    assert lines[0] == "# cifar10: recovery-model size, scdd (SSL) against sre2l (supervised)"
    assert "| resnet50 | scdd | 0.01 | first:10 | sweep | 25.0 ± 1.0 | -9.0 ± 1.0 | 25.0, 24.0, 26.0 |" in lines
    assert "| - | random | – | – | – | 34.0 ± 1.0 | 0.0 ± 0.0 | 35.0, 33.0, 34.0 |" in lines
    # cost: squeeze seconds from the backbone's checkpoint, recover mean over seeds, rate of image x iterations
    assert f"| resnet50 | scdd | 1,608 | 51.3 | 57 ± 12 | {r['recover_img_iters_per_s']:g} | 120 ± 0 |" in lines
    assert "- resnet101 scdd: not squeezed" in lines and "teacher, `t.pt`. Models (recovery and teacher)" in page
    assert lines[-2] == "python size_study.py x"


def test_best_settings_are_schema_keys():
    best = {"best": {"resnet18/scdd": {"config": {"bn_coef": 0.003, "first_multiplier": 30}},
                     "resnet18/sre2l": {"config": {"bn_weights": "linear:10,1", "bn_coef": 0.02}}}}
    assert size_study.best_settings(best, "resnet18", "scdd") == {"recover.bn_coef": 0.003,
                                                                   "recover.bn_weights": "first:30"}
    assert size_study.best_settings(best, "resnet18", "sre2l") == {"recover.bn_weights": "linear:10,1",
                                                                    "recover.bn_coef": 0.02}
    assert size_study.best_settings(best, "resnet50", "scdd") == {}
    assert json.dumps(size_study.best_settings({}, "resnet18", "scdd")) == "{}"


def test_an_error_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    from scdd_ray.errors import ConfigError

    def busy(a):
        raise ConfigError("out", "cells/x is in use by another scdd-ray run")

    monkeypatch.setattr(size_study, "run", busy)
    monkeypatch.setattr(sys, "argv", ["size_study.py", "--teacher", "t.pt", "--models-dir", "m", "--work", "w",
                                      "--json", str(tmp_path / "s.json"), "--ipc", "10", "--width", "0.25"])
    assert size_study.main() == 2
    assert capsys.readouterr().err == "size_study: error: out: cells/x is in use by another scdd-ray run\n"
