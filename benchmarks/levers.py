"""One table from several `scdd-ray bench table` runs that differ in one setting (a "lever").

Each run is a table of the random subset and distilled methods at one IPC, usually under --holdout (top-1
on the validation share of train; the test split is never read), at one or more seeds. Runs of the same
lever at several seeds are pooled; a lever's gain over the base setting is paired by seed and method, as
IOR (method minus random, same seed) is. Post-train levers move the random subset too: compare the IORs.

    python benchmarks/levers.py --md benchmarks/results/cifar10_levers.md \\
        base=runs/table/val-base-s0.json,runs/table/val-base-s1.json \\
        "init real=runs/table/val-init-real-s0.json" ...

The first lever named is the base the others are compared with.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tables import write_table  # noqa: E402


def per_seed(path: str) -> tuple[dict, dict, dict]:
    """({(method, seed): top-1}, overrides, {method: mean recover seconds}) of one table JSON (one IPC)."""
    with open(path) as f:
        t = json.load(f)
    if len(t["ipcs"]) != 1:
        raise SystemExit(f"{path}: expected a one-IPC table (got IPCs {t['ipcs']})")
    top = {(r["method"], s): v for r in t["rows"] for s, v in zip(t["seeds"], r["top1"]["values"])}
    secs = {r["method"]: r.get("recover_seconds", {}).get("mean") for r in t["rows"]}
    return top, t["overrides"], secs


def ms(vals: list[float]) -> str:
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def lever_table(levers: list[tuple[str, list[str]]]) -> tuple[str, list[dict]]:
    runs = {}
    for name, paths in levers:
        top, secs, overrides = {}, {}, {}
        for p in paths:
            t, overrides, s = per_seed(p)
            top.update(t)
            secs.update({m: v for m, v in s.items() if v is not None})
        runs[name] = (top, overrides, secs)
    base_name = levers[0][0]
    base = runs[base_name][0]
    head = (f"| lever | method | seeds | top-1 | gain over {base_name} (paired) | IOR (method - random) | per seed | "
            "recover s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    data = []
    for name, _ in levers:
        top, overrides, secs = runs[name]
        for method in sorted({m for m, _ in top}, key=lambda m: (m != "random", m)):
            seeds = sorted(s for m, s in top if m == method)
            vals = [top[(method, s)] for s in seeds]
            paired = [top[(method, s)] - base[(method, s)] for s in seeds if (method, s) in base]
            ior = [top[(method, s)] - top[("random", s)] for s in seeds if ("random", s) in top]
            gain = "–" if name == base_name else (ms(paired) if paired else "no common seed")
            shown_ior = "–" if method == "random" or not ior else ms(ior)
            lines.append(f"| {name} | {method} | {','.join(map(str, seeds))} | {ms(vals)} | {gain} | {shown_ior} | "
                         f"{', '.join(f'{v:.1f}' for v in vals)} | "
                         f"{f'{secs[method]:.0f}' if secs.get(method) is not None else '–'} |")
            data.append({"lever": name, "method": method, "seeds": seeds, "top1": vals, "ior": ior,
                         "gain_over_base": paired, "overrides": overrides, "recover_seconds": secs.get(method)})
    return "\n".join(lines) + "\n", data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("levers", nargs="+", help="NAME=table.json[,table.json...]; the first is the base")
    ap.add_argument("--md", required=True, help="Markdown output; the JSON goes beside it")
    ap.add_argument("--heading", default="Levers")
    a = ap.parse_args()
    levers = []
    for item in a.levers:
        name, _, paths = item.partition("=")
        existing = [p for p in paths.split(",") if os.path.isfile(p)]
        if existing:  # a lever whose runs are not done yet is left out, and said so
            levers.append((name, existing))
        else:
            print(f"levers: {name}: no finished run yet, left out", file=sys.stderr)
    table, data = lever_table(levers)
    command = "python benchmarks/levers.py " + " ".join(sys.argv[1:])
    write_table(a.md, f"## {a.heading}\n\nCommand: `{command}`", table, {"command": command, "levers": data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
