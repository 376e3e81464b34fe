"""Figures for benchmarks/results/, drawn from the JSON the benchmark commands write.

    python benchmarks/plot.py table benchmarks/results/cifar10_table.json --out benchmarks/results/cifar10_table.png
    python benchmarks/plot.py models OUT.json --out OUT.png     # a `scdd-ray bench models` JSON
    python benchmarks/plot.py ipc OUT.json --out OUT.png        # a `benchmarks/digits_grid.py --grid ipc` JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"random": "tab:gray", "sre2l": "tab:blue", "scdd": "tab:orange", "scdd-patches": "tab:green"}


def plot_models(res: dict, out: str) -> None:
    """`scdd-ray bench models`: recover throughput and top-1 per recovery arch, one bar per method."""
    rows = res["results"]
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["arch"], r["method"]): r for r in rows}
    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    # The step is timed once per arch (it does not depend on the backbone's weights); the job's
    # recover stage is per cell.
    step = {r["arch"]: r["step_img_iters_per_s"] for r in rows}
    ax_t.bar(range(len(archs)), [step[a] for a in archs], 0.6, color="lightgray", label="recover step (median of 5)")
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(archs))]
        got = [(x, cell[(a, m)]) for x, a in zip(xs, archs) if (a, m) in cell]
        ax_t.scatter([x for x, _ in got], [r["recover_img_iters_per_s"] for _, r in got], color=COLORS.get(m),
                     zorder=3, label=f"{m}: whole recover stage of the job")
        ax_a.bar([x for x, _ in got], [r["top1"] for _, r in got], width, label=f"{m} student", color=COLORS.get(m))
        ax_a.scatter([x for x, _ in got], [r["teacher_top1"] for _, r in got], marker="_", s=300, color="black",
                     zorder=3, label="teacher (recovery model)" if j == 0 else None)
        for x, r in got:
            ax_a.annotate(f"{r['top1']:.1f}", (x, r["top1"]), xytext=(0, -12), textcoords="offset points",
                          ha="center", fontsize=8, color="white")
    for ax in (ax_t, ax_a):
        ax.set_xticks(range(len(archs)), archs)
        ax.set_xlabel(f"recovery model (width {res['width']:g})")
    ax_t.set_ylabel("recover step: images x iterations / s")
    ax_t.set_title(f"recover throughput ({res['threads']} thread(s), {res.get('machine') or 'CPU'})", fontsize=9)
    ax_a.set_ylabel("top-1 on the real test split (%)")
    ax_a.set_title(f"{res['dataset']}, IPC {res['ipc']}, seed {res['seed']}", fontsize=9)
    low = min(min(r["top1"], r["teacher_top1"]) for r in rows)
    ax_a.set_ylim(max(0, 5 * int(low / 5) - 5), 100.5)
    ax_t.legend(fontsize=8)
    ax_a.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_ipc(res: dict, out: str) -> None:
    """benchmarks/digits_grid.py --grid ipc: top-1 mean and std over seeds against IPC, one line per method."""
    by_method: dict[str, list[tuple[int, list[float]]]] = {}
    for label, runs in res.items():
        if label in ("command", "commit", "machine"):  # the provenance benchmarks/_tables.py writes
            continue
        method, _, ipc = label.split()  # "scdd IPC 10"
        by_method.setdefault(method, []).append((int(ipc), [r["top1"] for r in runs]))
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, pts in by_method.items():
        pts.sort()
        ax.errorbar([p for p, _ in pts], [statistics.fmean(t) for _, t in pts],
                    yerr=[statistics.stdev(t) if len(t) > 1 else 0 for _, t in pts], marker="o", capsize=3,
                    label=method, color=COLORS.get(method))
    ax.set_xscale("log")
    ax.set_xticks(sorted({p for pts in by_method.values() for p, _ in pts}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("images per class")
    ax.set_ylabel("student top-1 on the real test split (%)")
    n = max(len(t) for pts in by_method.values() for _, t in pts)
    ax.set_title(f"digits, mean ± std over {n} seeds", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_table(res: dict, out: str) -> None:
    """`scdd-ray bench table`: top-1 (mean ± std over seeds) against IPC per method; random dashed, as the
    baseline every distilled set has to beat."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for method in res["methods"]:
        rows = sorted((r for r in res["rows"] if r["method"] == method), key=lambda r: r["ipc"])
        ax.errorbar([r["ipc"] for r in rows], [r["top1"]["mean"] for r in rows],
                    yerr=[r["top1"]["std"] for r in rows], marker="o", capsize=3, color=COLORS.get(method),
                    linestyle="--" if method == "random" else "-",
                    label=f"{method} (random real subset)" if method == "random" else method)
    ipcs = sorted(res["ipcs"])
    ax.set_xscale("log")
    ax.set_xticks(ipcs)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("images per class")
    where = "validation share of train" if res.get("overrides", {}).get("holdout") else "real test split"
    ax.set_ylabel(f"student top-1 on the {where} (%)")
    teacher = statistics.fmean(r["teacher_top1"]["mean"] for r in res["rows"])
    ax.axhline(teacher, color="black", linewidth=0.8, linestyle=":", label=f"teacher ({teacher:.1f})")
    ax.set_title(f"{res['dataset']}, one teacher for every method, mean ± std over {len(res['seeds'])} seeds",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("models", "ipc", "table"))
    ap.add_argument("json")
    ap.add_argument("--out", required=True, help="PNG path")
    a = ap.parse_args()
    with open(a.json) as f:
        res = json.load(f)
    tmp = a.out + ".tmp.png"
    {"models": plot_models, "ipc": plot_ipc, "table": plot_table}[a.kind](res, tmp)
    os.replace(tmp, a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
