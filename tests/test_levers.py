"""benchmarks/levers.py: one lever table from one-seed bench tables, gains paired by seed."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(path, seed, scdd, rnd, **overrides):
    rows = [{"method": m, "ipc": 10, "top1": {"mean": v}, "recover_seconds": {"mean": 100.0 + seed}}
            for m, v in (("random", rnd), ("scdd", scdd))]
    path.write_text(json.dumps({"seeds": [seed], "rows": rows, "overrides": overrides}))
    return str(path)


def test_lever_table_pairs_gains_by_seed(tmp_path):
    b0, b1 = _table(tmp_path / "b0.json", 0, 25.0, 33.0), _table(tmp_path / "b1.json", 1, 27.0, 34.0)
    l0 = _table(tmp_path / "l0.json", 0, 26.5, 33.0, **{"recover.init": "real"})
    l1 = _table(tmp_path / "l1.json", 1, 27.5, 34.0, **{"recover.init": "real"})
    md = tmp_path / "levers.md"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "levers.py"), "--md", str(md),
                          f"base={b0},{b1}", f"init real={l0},{l1}", f"missing={tmp_path / 'none.json'}"],
                         capture_output=True, text=True, check=True)
    assert "missing: no finished run yet" in out.stderr
    data = json.loads((tmp_path / "levers.json").read_text())
    assert [d["lever"] for d in data] == ["base", "init real"]
    assert data[1]["gain_over_base"] == pytest.approx([1.5, 0.5])
    assert data[1]["ior"] == pytest.approx([-6.5, -6.5])
    assert "| init real | 0,1 | 27.0 ± 0.7 | 1.0 ± 0.7 | -6.5 ± 0.0 | 26.5, 27.5 | 100 |" in md.read_text()
