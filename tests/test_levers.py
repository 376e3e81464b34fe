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
    assert rows[("bn train", "scdd")]["gain_over_base"] == pytest.approx([1.5, 0.5])
    assert rows[("bn train", "random")]["gain_over_base"] == pytest.approx([2.0, 1.0])  # it lifts random too
    assert rows[("bn train", "scdd")]["ior"] == pytest.approx([-8.5, -7.5])  # so the gap did not close
    assert rows[("base", "scdd")]["ior"] == pytest.approx([-8.0, -7.0])
    assert "| bn train | scdd | 0,1 | 27.0 ± 0.7 | 1.0 ± 0.7 | -8.0 ± 0.7 | 26.5, 27.5 | 104 |" in md.read_text()
