"""`bench table`: one teacher file for every method, IOR and HLR columns, resume cell by cell."""
import json
import os

import pytest

from scdd_ray.cli import main

from test_cli_errors import run_err


@pytest.mark.slow
def test_table_shares_one_teacher_and_carries_ior_and_hlr(tmp_path, capsys):
    work, out = tmp_path / "w", tmp_path / "t.json"
    argv = ["-q", "bench", "table", "--dataset", "synthetic", "--methods", "random,scdd", "--ipcs", "1",
            "--seeds", "0", "--full-epochs", "3", "--work", str(work), "--json", str(out), "--md",
            str(tmp_path / "t.md")]
    assert main(argv) == 0
    table = json.loads(out.read_text())
    reports = {m: json.loads((work / "cells" / f"synthetic-{m}-ipc1-seed0" / "report.json").read_text())
               for m in ("random", "scdd")}
    # the same teacher FILE relabels the random subset and the distilled set
    assert reports["random"]["teacher"] == reports["scdd"]["teacher"]
    assert reports["random"]["teacher_method"] == "supervised" and reports["scdd"]["backbone_method"] == "simclr"
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["random"]["ior"]["mean"] == 0.0
    assert rows["scdd"]["ior"]["mean"] == pytest.approx(reports["scdd"]["top1"] - reports["random"]["top1"])
    full = table["full_hard_top1"]["0"]
    hard = json.loads((work / "cells" / "synthetic-scdd-ipc1-seed0" / "hard.json").read_text())["hard_top1"]
    assert rows["scdd"]["hlr"]["mean"] == pytest.approx(full - hard)
    assert "| IOR | HLR |" in (tmp_path / "t.md").read_text()
    # a rerun reads every cell back: nothing is recomputed, the table is the same
    stamps = {p: os.path.getmtime(p) for p in work.rglob("*.json")}
    assert main(argv) == 0
    assert json.loads(out.read_text())["rows"] == table["rows"]
    assert all(os.path.getmtime(p) == t for p, t in stamps.items())


def test_table_flags_are_checked_before_any_work(tmp_path, capsys):
    base = ["bench", "table", "--dataset", "synthetic", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "j")]
    assert "--methods" in run_err(capsys, base + ["--methods", "random,dm"])
    assert "--ipcs" in run_err(capsys, base + ["--ipcs", "0,1"])
    assert "--part" in run_err(capsys, base + ["--part", "3/2"])
    assert "--iterations" in run_err(capsys, base + ["--iterations", "0"])
    assert not (tmp_path / "w").exists()
