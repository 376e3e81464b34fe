"""The model-size study's BN picture (the paper's Figure 4, one panel column per recovery-model size): how
much BN running statistics vary across channels, per layer, SSL against supervised, from the `scdd-ray
inspect-bn` JSON of each size (its first group the SSL model, its second the supervised one). The table
says, per size, the first layer (which `first:M` weighs up) apart from the rest, since on digits and at
ResNet-18 the SSL gap sits in the first layer only.

    python benchmarks/size_bn.py benchmarks/results/cifar10_size_inspect_bn_resnet{18,50,101}.json \\
        --md benchmarks/results/cifar10_size_bn.md --plot benchmarks/results/cifar10_size_bn.png
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from _tables import write_table  # noqa: E402

STATS = (("mean_variance", "running_mean"), ("var_variance", "running_var"))


def size_row(path: str, inspect: dict) -> dict:
    """One size: the SSL and supervised groups' first-layer and other-layer across-channel variances, and
    SSL over supervised for each (above 1: the SSL statistics vary more)."""
    ssl, sup = inspect["groups"][:2]
    row = {"source": path, "ssl": ssl["label"], "supervised": sup["label"],
           "layers": len(ssl["checkpoints"][0]["layers"])}
    for key, _ in STATS:
        for part in ("first", "rest"):
            a, b = ssl["summary"][f"{key}_{part}"]["mean"], sup["summary"][f"{key}_{part}"]["mean"]
            row[f"{key}_{part}"] = {"ssl": a, "supervised": b, "ratio": a / b if b else None}
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| recovery models | BN layers | running_var, first layer: SSL / sup. (ratio) | running_var, other "
            "layers | running_mean, first layer | running_mean, other layers |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = [f"{r[f'{k}_{p}']['ssl']:.3g} / {r[f'{k}_{p}']['supervised']:.3g} "
                 f"({r[f'{k}_{p}']['ratio']:.2f}x)" for k, p in (("var_variance", "first"), ("var_variance", "rest"),
                                                                 ("mean_variance", "first"),
                                                                 ("mean_variance", "rest"))]
        out.append(f"| {r['ssl']} vs {r['supervised']} | {r['layers']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(inspects: list[dict], out: str) -> None:
    """Rows: running_mean and running_var; columns: sizes; per layer, the SSL and the supervised model."""
    fig, axes = plt.subplots(2, len(inspects), figsize=(4.2 * len(inspects), 6.5), squeeze=False)
    for col, ins in enumerate(inspects):
        for row, (key, stat) in enumerate(STATS):
            ax = axes[row][col]
            for grp, color in zip(ins["groups"][:2], ("tab:orange", "tab:blue")):
                vals = np.array([[layer[key] for layer in ck["layers"]] for ck in grp["checkpoints"]], dtype=float)
                ax.plot(np.arange(vals.shape[1]), vals.mean(axis=0), marker="o", ms=2.5, color=color,
                        label=grp["label"])
            ax.set_yscale("log")
            ax.set_title(f"{stat}: across-channel variance", fontsize=9)
            ax.set_xlabel("BatchNorm layer (model order)", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inspect", nargs="+", help="`scdd-ray inspect-bn` JSONs, one per size: SSL group first")
    ap.add_argument("--md", required=True)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    inspects = [json.load(open(p)) for p in a.inspect]
    rows = [size_row(p, ins) for p, ins in zip(a.inspect, inspects)]
    heading = ("# BN statistics across recovery-model sizes, SSL against supervised\n\nAcross-channel variance "
               "of each BN layer's running statistics, the first layer apart from the mean over the others; "
               "ratio above 1: the SSL model's statistics vary more (the paper's premise).")
    if a.plot:
        heading += f" Per layer: [{os.path.basename(a.plot)}]({os.path.relpath(a.plot, os.path.dirname(a.md))})."
    heading += f"\n\n```bash\n{shlex.join(['python', *sys.argv])}\n```"
    write_table(a.md, heading, markdown(rows), {"rows": rows, "sources": [ins.get("command") for ins in inspects]})
    if a.plot:
        plot(inspects, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
