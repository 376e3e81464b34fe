"""One table from several `scdd-ray bench table` runs that differ in one recover setting (a "lever").

Each run is a table of `random` and `scdd` at one IPC, usually under --holdout
(top-1 on the validation share of train; the test split is never read). Runs
of the same lever at several seeds are pooled; the lever's gain over the base
setting is paired by seed, as IOR is.

    python benchmarks/levers.py --md benchmarks/cifar10_levers.md \\
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


def scdd_and_random(path: str) -> tuple[int, float, float, dict, float | None]:
    """(seed, scdd top-1, random top-1, overrides, scdd recover seconds) of a one-seed table JSON."""
    with open(path) as f:
        t = json.load(f)
    if len(t["seeds"]) != 1:
        raise SystemExit(f"{path}: expected a one-seed table (got seeds {t['seeds']})")
    rows = {r["method"]: r for r in t["rows"]}
    secs = rows["scdd"].get("recover_seconds", {}).get("mean")
    return t["seeds"][0], rows["scdd"]["top1"]["mean"], rows["random"]["top1"]["mean"], t["overrides"], secs


def ms(vals: list[float]) -> str:
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def lever_table(levers: list[tuple[str, list[str]]]) -> tuple[str, list[dict]]:
    runs = {name: {s: rest for s, *rest in map(scdd_and_random, paths)} for name, paths in levers}
    base_name = levers[0][0]
    base = runs[base_name]
    head = (f"| lever | seeds | scdd top-1 | gain over {base_name} (paired) | IOR (scdd - random) | per seed | "
            "recover s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    data = []
    for name, _ in levers:
        r = runs[name]
        seeds = sorted(r)
        top = [r[s][0] for s in seeds]
        ior = [r[s][0] - r[s][1] for s in seeds]
        paired = [r[s][0] - base[s][0] for s in seeds if s in base]
        gain = "–" if name == base_name else (ms(paired) if paired else "no common seed")
        secs = [r[s][3] for s in seeds if r[s][3] is not None]
        lines.append(f"| {name} | {','.join(map(str, seeds))} | {ms(top)} | {gain} | {ms(ior)} | "
                     f"{', '.join(f'{v:.1f}' for v in top)} | {f'{statistics.fmean(secs):.0f}' if secs else '–'} |")
        data.append({"lever": name, "seeds": seeds, "top1": top, "ior": ior, "gain_over_base": paired,
                     "overrides": r[seeds[0]][2], "recover_seconds": secs})
    return "\n".join(lines) + "\n", data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("levers", nargs="+", help="NAME=table.json[,table.json...] (one per seed); the first is the base")
    ap.add_argument("--md", required=True, help="Markdown output; the JSON goes beside it")
    ap.add_argument("--heading", default="Recover levers")
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
    write_table(a.md, f"## {a.heading}", table, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
