"""benchmarks/levers.py: one lever table from bench tables, gains and IOR paired by seed and method."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(path, seeds, values, **overrides):
    """A bench table JSON of one IPC: `values` maps a method to its top-1 per seed."""
    rows = [{"method": m, "ipc": 10, "top1": {"mean": sum(v) / len(v), "values": v},
             "recover_seconds": {"mean": 100.0 + len(m)}} for m, v in values.items()]
    path.write_text(json.dumps({"seeds": seeds, "ipcs": [10], "rows": rows, "overrides": overrides}))
    return str(path)


def test_lever_table_pairs_gains_and_ior_by_seed(tmp_path):
    # the base in two one-seed tables, the lever in one table of both seeds: pooled by seed alike
    b0 = _table(tmp_path / "b0.json", [0], {"random": [33.0], "scdd": [25.0]})
    b1 = _table(tmp_path / "b1.json", [1], {"random": [34.0], "scdd": [27.0]})
    lever = _table(tmp_path / "l.json", [0, 1], {"random": [35.0, 35.0], "scdd": [26.5, 27.5]},
                   **{"posttrain.teacher_bn": "train"})
    md = tmp_path / "levers.md"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "levers.py"), "--md", str(md),
                          f"base={b0},{b1}", f"bn train={lever}", f"missing={tmp_path / 'none.json'}"],
                         capture_output=True, text=True, check=True)
    assert "missing: no finished run yet" in out.stderr
    data = json.loads((tmp_path / "levers.json").read_text())
    assert data["command"].startswith("python benchmarks/levers.py --md ")
    assert "commit" in data and data["machine"]["cpu_count"] == os.cpu_count()  # stamped by _tables.py
    rows = {(d["lever"], d["method"]): d for d in data["levers"]}
    assert list(rows) == [("base", "random"), ("base", "scdd"), ("bn train", "random"), ("bn train", "scdd")]
    assert rows[("bn train", "scdd")]["gain_over_base"]["values"] == pytest.approx([1.5, 0.5])
    assert rows[("bn train", "random")]["gain_over_base"]["values"] == pytest.approx([2.0, 1.0])  # lifts random
    ior = rows[("bn train", "scdd")]["ior"]
    assert ior["values"] == pytest.approx([-8.5, -7.5]) and ior["mean"] == pytest.approx(-8.0)  # gap not closed
    assert ior["std"] == pytest.approx(0.7071, abs=1e-3)
    assert rows[("base", "scdd")]["ior"]["values"] == pytest.approx([-8.0, -7.0])
    assert rows[("base", "scdd")]["ipc"] == 10 and rows[("base", "scdd")]["evaluated_on"] == "test"
    assert "| bn train | scdd | 10 | 0,1 | 27.0 ± 0.7 | 1.0 ± 0.7 | -8.0 ± 0.7 | 26.5, 27.5 | 104 |" in md.read_text()


def test_lever_tables_of_several_ipcs_pair_within_each_ipc(tmp_path):
    def table(name, ipc, values, **overrides):
        rows = [{"method": m, "ipc": ipc, "top1": {"values": v}} for m, v in values.items()]
        (tmp_path / name).write_text(json.dumps({"seeds": [0, 1], "ipcs": [ipc], "rows": rows,
                                                 "overrides": {"holdout": True, **overrides}}))
        return str(tmp_path / name)

    base = ",".join([table("b1.json", 1, {"random": [20.0, 22.0], "scdd": [19.0, 20.0]}),
                     table("b10.json", 10, {"random": [35.0, 36.0], "scdd": [25.0, 24.0]})])
    recipe = ",".join([table("r1.json", 1, {"scdd": [23.0, 21.0]}, **{"recover.init": "real"}),
                       table("r10.json", 10, {"scdd": [36.0, 38.0]}, **{"recover.init": "real"})])
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "levers.py"), "--md", str(tmp_path / "x.md"),
                    f"paper={base}", f"recipe={recipe}"], capture_output=True, text=True, check=True)
    rows = {(d["lever"], d["method"], d["ipc"]): d for d in json.loads((tmp_path / "x.json").read_text())["levers"]}
    assert rows[("recipe", "scdd", 10)]["gain_over_base"]["values"] == pytest.approx([11.0, 14.0])
    assert rows[("recipe", "scdd", 1)]["gain_over_base"]["values"] == pytest.approx([4.0, 1.0])
    assert rows[("recipe", "scdd", 1)]["evaluated_on"] == "val"
    # the recipe's tables hold no random subset: its IOR is against nothing, not against another table's
    assert rows[("recipe", "scdd", 10)]["ior"]["values"] == []
