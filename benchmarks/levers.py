"""One table from several `scdd-ray bench table` runs that differ in one setting (a "lever").

Each run is a table of the random subset and distilled methods at one or more IPCs, usually under --holdout
(top-1 on the validation share of train; the test split is never read), at one or more seeds. Runs of the
same lever at several seeds are pooled; a lever's gain over the base setting is paired by seed, method and
IPC, as IOR (method minus random, same seed and IPC) is. Post-train levers move the random subset too:
compare the IORs. Rows carry the split top-1 was measured on (`evaluated_on`: val or test).

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


def per_seed(path: str) -> tuple[dict, dict, dict, str]:
    """({(method, ipc, seed): top-1}, overrides, {(method, ipc): mean recover seconds}, split) of one table
    JSON; split is what top-1 was measured on ("val" under --holdout, else "test")."""
    with open(path) as f:
        t = json.load(f)
    top = {(r["method"], r["ipc"], s): v for r in t["rows"] for s, v in zip(t["seeds"], r["top1"]["values"])}
    secs = {(r["method"], r["ipc"]): r.get("recover_seconds", {}).get("mean") for r in t["rows"]}
    return top, t["overrides"], secs, "val" if t["overrides"].get("holdout") else "test"


def ms(vals: list[float]) -> str:
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def stats(vals: list[float]) -> dict:
    """Mean, sample std (0 for one value) and the values, as bench table writes them."""
    return {"mean": round(statistics.fmean(vals), 3) if vals else None,
            "std": round(statistics.stdev(vals), 3) if len(vals) > 1 else 0.0, "values": vals}


def lever_table(levers: list[tuple[str, list[str]]]) -> tuple[str, list[dict]]:
    runs = {}
    for name, paths in levers:
        top, secs, overrides, splits = {}, {}, {}, set()
        for p in paths:
            t, overrides, s, split = per_seed(p)
            top.update(t)
            splits.add(split)
            secs.update({k: v for k, v in s.items() if v is not None})
        if len(splits) > 1:
            raise SystemExit(f"levers: {name}: its tables were measured on different splits ({sorted(splits)})")
        runs[name] = (top, overrides, secs, splits.pop())
    base_name = levers[0][0]
    base = runs[base_name][0]
    head = (f"| lever | method | IPC | seeds | top-1 | gain over {base_name} (paired) | IOR (method - random) | "
            "per seed | recover s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    data = []
    for name, _ in levers:
        top, overrides, secs, split = runs[name]
        for method, ipc in sorted({(m, c) for m, c, _ in top}, key=lambda k: (k[1], k[0] != "random", k[0])):
            seeds = sorted(s for m, c, s in top if (m, c) == (method, ipc))
            vals = [top[(method, ipc, s)] for s in seeds]
            paired = [top[(method, ipc, s)] - base[(method, ipc, s)] for s in seeds if (method, ipc, s) in base]
            ior = [top[(method, ipc, s)] - top[("random", ipc, s)] for s in seeds if ("random", ipc, s) in top]
            gain = "–" if name == base_name else (ms(paired) if paired else "no common seed")
            shown_ior = "–" if method == "random" or not ior else ms(ior)
            sec = secs.get((method, ipc))
            lines.append(f"| {name} | {method} | {ipc} | {','.join(map(str, seeds))} | {ms(vals)} | {gain} | "
                         f"{shown_ior} | {', '.join(f'{v:.1f}' for v in vals)} | "
                         f"{f'{sec:.0f}' if sec is not None else '–'} |")
            data.append({"lever": name, "method": method, "ipc": ipc, "evaluated_on": split, "seeds": seeds,
                         "top1": stats(vals), "ior": stats(ior), "gain_over_base": stats(paired),
                         "overrides": overrides, "recover_seconds": sec})
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
