"""benchmarks/size_bn.py: the per-size SSL-vs-supervised BN table from `inspect-bn` JSONs (first layer apart
from the rest, SSL over supervised) and its figure."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import size_bn  # noqa: E402


def _group(label, var_first, var_rest, n_layers=3):
    layers = [{"mean_variance": 0.01 * (i + 1), "var_variance": var_first if i == 0 else var_rest}
              for i in range(n_layers)]
    summary = {f"{k}_{p}": {"mean": v, "std": 0.0} for k, p, v in (
        ("var_variance", "first", var_first), ("var_variance", "rest", var_rest),
        ("mean_variance", "first", 0.01), ("mean_variance", "rest", 0.025))}
    return {"label": label, "checkpoints": [{"layers": layers}], "summary": summary}


def test_row_ratio_and_page(tmp_path):
    ins = {"command": "scdd-ray inspect-bn ...",
           "groups": [_group("SimCLR R18", 1.5, 0.02), _group("sup R18", 0.75, 0.05)]}
    r = size_bn.size_row("a.json", ins)
    assert r["layers"] == 3 and r["var_variance_first"] == {"ssl": 1.5, "supervised": 0.75, "ratio": 2.0}
    assert r["var_variance_rest"]["ratio"] == pytest.approx(0.4)
    assert "| SimCLR R18 vs sup R18 | 3 | 1.5 / 0.75 (2.00x) | 0.02 / 0.05 (0.40x) | 0.01 / 0.01 (1.00x) |" \
        in size_bn.markdown([r])
    src = tmp_path / "r18.json"
    src.write_text(json.dumps(ins))
    md, png = tmp_path / "bn.md", tmp_path / "bn.png"
    subprocess.run([sys.executable, os.path.join(BENCH, "size_bn.py"), str(src), str(src), "--md", str(md),
                    "--plot", str(png)], check=True, capture_output=True)
    data = json.loads((tmp_path / "bn.json").read_text())
    assert len(data["rows"]) == 2 and data["sources"] == ["scdd-ray inspect-bn ..."] * 2 and "command" in data
    page = md.read_text()
    assert page.count("(2.00x)") == 2 and "[bn.png](bn.png)" in page and png.stat().st_size > 10_000
    assert "```bash\npython " in page and page.split("```bash\n")[1].split("\n")[0].endswith(f"--plot {png}")
