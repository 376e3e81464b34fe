"""benchmarks/size_study.py: rows of the model-size study from cell reports (IOR paired by seed), the sweep's
settings per cell, and the figure."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import size_study  # noqa: E402

from scdd_ray.models.checkpoint import load_checkpoint, save_checkpoint, weights_digest  # noqa: E402
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
    assert r["backbone_digest"] == weights_digest(load_checkpoint(str(bb)))
    assert r["recover_img_iters_per_s"] == round(100 * 200 / ((50 + 50 + 70) / 3), 2)
    rows = [size_study.row("-", "random", random, random, {}), r,
            {**r, "method": "sre2l", "top1": {"mean": 27.0, "std": 1.0, "values": [27.0]},
             "recover_seconds": {"mean": 1633.5, "std": 193.2, "values": [1633.5]}}]
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
    assert f"| resnet50 | sre2l | 1,608 | 51.3 | 1,634 ± 193 | {r['recover_img_iters_per_s']:g} | 120 ± 0 |" in lines
    assert "- resnet101 scdd: not squeezed" in lines and "teacher, `t.pt`. Models (recovery and teacher)" in page
    assert lines[-2] == "python size_study.py x"


def test_recover_cost_counts_every_process_that_wrote_the_set(tmp_path):
    from scdd_ray.store.shards import ShardStore

    st = ShardStore(str(tmp_path / "cell" / "distilled"))
    st.open("f")
    for i, sec in enumerate((31.0, 33.0)):
        st.write_shard(f"s{i}", [i], [0], torch.zeros(1, 3, 4, 4, dtype=torch.uint8), extra={"seconds": sec})
    resumed = {"recover_seconds": 0.03, "config": {"out": str(tmp_path / "cell")}}  # its set done before
    assert size_study.recover_cost(resumed) == 64.0  # a report from before the sum: read from the manifest
    assert size_study.recover_cost({**resumed, "recover_actor_seconds": 70.0}) == 70.0
    assert size_study.recover_cost({"recover_seconds": 0.3, "config": {"out": str(tmp_path / "none")}}) == 0.3
    both = size_study._mean_std([None, 360.0, 380.0])  # a post-train kept from before its time was recorded
    assert both["values"] == [360.0, 380.0] and both["mean"] == 370.0 and size_study._mean_std([None]) is None


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


def _study(rows, **kw):
    return {"dataset": "cifar10", "ipc": 10, "seeds": [0, 1, 2], "train_noval": True, "commit": "abc1234",
            "rows": rows, **kw}


def test_an_earlier_row_is_reused_only_when_it_measured_the_same_cell():
    recover = {"iterations": 500, "bn_coef": 0.01, "bn_weights": "first:10"}
    rnd = {"arch": "-", "method": "random", "seeds": [0, 1, 2], "top1": {"values": [38.3, 37.3, 38.4]}}
    old = {"arch": "resnet18", "method": "scdd", "recover": recover, "teacher": "runs/a/t.pt",
           "top1": {"values": [26.3, 29.6, 27.0]}}
    prev = _study([rnd, old])
    random_now = {0: {"top1": 38.3}, 1: {"top1": 37.3}, 2: {"top1": 38.4}}
    study = _study([])

    def reuse(p=prev, arch="resnet18", rec=recover, rnd_now=random_now, teacher="runs/b/t.pt", digest="d1",
              st=study):
        return size_study.reusable_row(p, arch, "scdd", rec, rnd_now, teacher, digest, st)

    got = reuse()  # another directory, the same teacher file; no digest recorded then: the random rows decide
    assert got["top1"]["values"] == [26.3, 29.6, 27.0] and got["reused_from"] == "abc1234"
    assert got["random_drift"] == 0.0
    assert reuse(arch="resnet50") is None  # no such row
    assert reuse(rec={**recover, "bn_coef": 0.02}) is None  # other settings
    assert reuse(teacher="runs/a/t2.pt") is None  # another teacher
    # another session's rounding moves the random subset by a tenth of a point; a changed teacher or post-train
    # by points: the first is reused and says by how much, the second is not
    drifted = reuse(rnd_now={**random_now, 0: {"top1": 38.41}, 2: {"top1": 38.2}})
    assert drifted["random_drift"] == 0.2 and drifted["top1"] == old["top1"]
    assert reuse(rnd_now={**random_now, 2: {"top1": 38.71}}) is None
    assert reuse(rnd_now={**random_now, 2: {"top1": 36.9}}) is None
    assert reuse(rnd_now={**random_now, 3: {"top1": 36.9}}) is None  # a seed that run did not measure
    # a row reused once names the run that measured it, not the run that reused it
    again = _study([rnd, {**old, "reused_from": "0ld0ld0"}], commit="def5678")
    assert reuse(p=again)["reused_from"] == "0ld0ld0"
    assert reuse(st=_study([], seeds=[0, 1])) is None and reuse(st=_study([], train_noval=False)) is None
    with_digest = _study([rnd, {**old, "teacher_digest": "d0"}])
    assert reuse(p=with_digest) is None and reuse(p=with_digest, digest="d0") is not None


def test_best_files_merge_and_a_cell_chosen_twice_is_refused(tmp_path):
    from scdd_ray.errors import ConfigError

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"best": {"resnet18/scdd": {"config": {"bn_coef": 0.03}}}}))
    b.write_text(json.dumps({"best": {"resnet101/scdd": {"config": {"bn_coef": 0.01, "bn_weights": "exp:0.9"}}}}))
    merged = size_study.merge_best([str(a), str(b)])
    assert size_study.best_settings(merged, "resnet18", "scdd") == {"recover.bn_coef": 0.03}
    assert size_study.best_settings(merged, "resnet101", "scdd") == {"recover.bn_coef": 0.01,
                                                                      "recover.bn_weights": "exp:0.9"}
    with pytest.raises(ConfigError, match="resnet18/scdd is chosen in more than one"):
        size_study.merge_best([str(a), str(a)])


def test_the_page_names_reused_rows():
    r = {"arch": "resnet18", "method": "sre2l", "recover": {"bn_coef": 0.002, "bn_weights": "first:1"},
         "chosen_by_sweep": True, "top1": {"mean": 23.2, "std": 0.4, "values": [22.7, 23.3, 23.6]},
         "ior": {"mean": -14.8, "std": 0.8}, "teacher": "t.pt", "evaluated_on": "test", "squeeze_seconds": 671.0,
         "backbone_val_top1": 69.7, "recover_seconds": {"mean": 206, "std": 40},
         "recover_img_iters_per_s": 242.86, "posttrain_seconds": {"mean": 176, "std": 2},
         "reused_from": "1e7d332abcdef"}
    page = size_study.markdown({**_study([r, {**r, "arch": "resnet50", "random_drift": 0.11}]), "command": "c",
                                "machine": {}})
    assert ("within 0.3 of that run's at every seed): resnet18 sre2l (commit 1e7d332), resnet50 sre2l (commit "
            "1e7d332, random subset 0.11 apart at most). Their IOR is paired with that run's random subset." in page
            and "| resnet18 | sre2l | 0.002 | first:1 | sweep | 23.2 ± 0.4 | -14.8 ± 0.8 |" in page)
    host = {"arch": "x86_64", "cpu_model": "Xeon", "cpu_isa": ["avx2", "amx_bf16"], "cpu_count": 2, "gpus": []}
    page = size_study.markdown({**_study([r]), "command": "c", "machine": host})
    assert "Machine: x86_64, Xeon (avx2, amx_bf16), 2 CPUs, GPUs: none" in page  # which host: see provenance.cpu


def test_an_unknown_method_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["size_study.py", "--teacher", "t.pt", "--models-dir", "m", "--work", "w",
                                      "--json", str(tmp_path / "s.json"), "--methods", "sre2l,random"])
    assert size_study.main() == 2
    assert capsys.readouterr().err == "size_study: error: --methods: random is not one of sre2l, scdd\n"
    assert not (tmp_path / "s.json").exists()
