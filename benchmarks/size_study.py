"""The model-size study: scdd vs sre2l recovery from ResNet-18, -50 and -101, each with its own best recover
settings, against a random real subset, all relabelled by one outside teacher and post-trained alike.

Every cell is a `bench table` cell (a full `distill` run, resumable): per (arch, method) the settings a
sweep chose (`--best`, a `tune` best.json; a cell it lacks runs at the preset's settings, and the row says
so), models squeezed once (`--model-seed 0`, shared through `--models-dir`), seeds paired: IOR is the cell's
top-1 minus the random subset's at the same seed. Rows also carry what each size costs: the backbone's
squeeze seconds (its checkpoint records them), recover seconds and images x iterations per second,
post-train seconds. The JSON is written after every cell, with what is missing said.

`--reuse EARLIER.json` takes rows an earlier run of this study measured instead of running their cells
again, when they measure the same thing (`reusable_row`): it lets a table grow by one recovery model after
the earlier cells' directories and models are gone. `--best` takes several sweeps' best.json files,
comma-separated (one sweep per arch, say); a cell in two of them is an error.

    python benchmarks/size_study.py --dataset cifar10 --data-dir ../shared/data/cifar10 \\
        --teacher T.pt --models-dir runs/size/cache --best runs/size/sweep/best.json \\
        --work runs/size/final --json benchmarks/results/cifar10_size.json --plot benchmarks/results/cifar10_size.png \\
        --md benchmarks/results/cifar10_size.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from scdd_ray.backbones import plan_models
from scdd_ray.bench.table import TableSpec, run_cell
from scdd_ray.errors import ConfigError, ScddError
from scdd_ray.models.checkpoint import load_checkpoint, weights_digest
from scdd_ray.provenance import commit, machine
from scdd_ray.store.atomic import atomic_write_bytes, atomic_write_json
from scdd_ray.store.shards import ShardStore

ARCHS = ("resnet18", "resnet50", "resnet101")
METHODS = ("sre2l", "scdd")


def best_settings(best: dict, arch: str, method: str) -> dict:
    """The recover settings a sweep chose for (arch, method), as schema keys ({} when it has none)."""
    cell = best.get("best", {}).get(f"{arch}/{method}")
    if not cell:
        return {}
    out = {}
    for k, v in cell["config"].items():
        if k == "first_multiplier":
            out["recover.bn_weights"] = f"first:{v:g}"
        else:
            out[f"recover.{k}"] = v
    return out


def merge_best(paths: list[str]) -> dict:
    """The cells of several sweeps' best.json files as one; a cell two of them choose is refused, since which
    choice the table ran would otherwise depend on the order of the flag's files."""
    merged: dict = {"best": {}}
    for path in paths:
        for cell, chosen in json.load(open(path)).get("best", {}).items():
            if cell in merged["best"]:
                raise ConfigError("best", f"{cell} is chosen in more than one of {', '.join(paths)}")
            merged["best"][cell] = chosen
    return merged


# How far (top-1 points) this run's random subset may score from an earlier run's, seed by seed, for the
# earlier run's rows to be reused. The same random cells, post-trained again in a later session with no
# behaviour change in between, scored 36.85, 38.47, 36.58 against 36.78, 38.58, 36.52 (within 0.11; a
# session may land on another host, whose bf16 kernels round differently); a changed teacher or post-train
# protocol moved them by 1 to 3 points.
REUSE_RANDOM_TOLERANCE = 0.3


def reusable_row(prev: dict, arch: str, method: str, recover: dict, random: dict, teacher: str,
                 teacher_digest: str, study: dict) -> dict | None:
    """The row of `prev` (an earlier run's JSON) that measured what the cell (arch, method) would, or None.

    The same study (dataset, IPC, seeds, split), the same recover settings, the same teacher file and, when
    both runs recorded it, the same teacher weights; and this run's random subset scores what the earlier one
    did, seed by seed, within REUSE_RANDOM_TOLERANCE: that shows the teacher and the post-train unchanged.
    Rows from before teacher digests were recorded rest on it. The reused row says by how much the random
    subsets differed (`random_drift`, the largest difference over seeds).
    """
    if any(prev.get(k) != study.get(k) for k in ("dataset", "ipc", "seeds", "train_noval")):
        return None
    old = {(r["arch"], r["method"]): r for r in prev.get("rows", [])}
    row, old_random = old.get((arch, method)), old.get(("-", "random"))
    if row is None or old_random is None or row["recover"] != recover:
        return None
    if os.path.basename(row["teacher"]) != os.path.basename(teacher):
        return None
    if row.get("teacher_digest") and row["teacher_digest"] != teacher_digest:
        return None
    then = dict(zip(old_random["seeds"], old_random["top1"]["values"]))
    if any(s not in then for s in random):
        return None
    drift = max(abs(then[s] - random[s]["top1"]) for s in random)
    if drift > REUSE_RANDOM_TOLERANCE:
        return None
    return {**row, "reused_from": row.get("reused_from") or prev.get("commit"), "random_drift": round(drift, 2)}


def recover_cost(report: dict) -> float:
    """A cell's recover seconds: its shards' own seconds summed over every process that wrote them. The run's
    wall time counts only the last process, nearly nothing for a cell resumed after its set was finished;
    reports from before the sum was recorded have it in their set's manifest. The wall time is left for
    cells with no shards (the random subset)."""
    seconds = report.get("recover_actor_seconds")
    out = (report.get("config") or {}).get("out")
    if seconds is None and out:
        seconds = ShardStore(os.path.join(out, "distilled")).recover_seconds()
    return report["recover_seconds"] if seconds is None else seconds


def _mean_std(vals: list[float | None]) -> dict | None:
    vals = [v for v in vals if v is not None]  # a time a run did not record (a post-train kept from before)
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}


def row(arch: str, method: str, reports: dict, random: dict, settings: dict) -> dict:
    """One row: per-seed top-1 and IOR (paired by seed with the random subset), teacher, settings, costs."""
    seeds = sorted(reports)
    top = [reports[s]["top1"] for s in seeds]
    first = reports[seeds[0]]
    out = {"arch": arch, "method": method, "seeds": seeds, "top1": _mean_std(top),
           "teacher": first["teacher"], "teacher_top1": first["teacher_top1"], "evaluated_on": first["evaluated_on"],
           "recover": first["config"]["recover"], "chosen_by_sweep": bool(settings),
           "recover_seconds": _mean_std([recover_cost(reports[s]) for s in seeds]),
           "posttrain_seconds": _mean_std([reports[s]["posttrain_seconds"] for s in seeds])}
    paired = [s for s in seeds if s in random]
    if paired:
        out["ior"] = _mean_std([reports[s]["top1"] - random[s]["top1"] for s in paired])
    if method != "random":
        work = first["num_images"] * first["config"]["recover"]["iterations"]
        out["recover_img_iters_per_s"] = round(work / out["recover_seconds"]["mean"], 2)
        # the digest names the recovery model itself: a path under runs/ outlives neither a lost runs/ nor
        # a squeeze run again, and rows of two models with one name must not read as one
        ckpt = load_checkpoint(first["backbone"])
        out.update(backbone=first["backbone"], backbone_method=first["backbone_method"],
                   backbone_digest=weights_digest(ckpt), squeeze_seconds=ckpt.meta.get("seconds"),
                   backbone_val_top1=ckpt.meta.get("test_top1"))
    return out


def run(a: argparse.Namespace) -> dict:
    common = {"data_dir": a.data_dir, "teacher": a.teacher, "models_dir": a.models_dir}
    if a.width != _preset(a, "width"):  # a setting equal to the preset's would name the cells apart from
        common["width"] = a.width       # `bench table`'s, whose random subsets they share
    if a.holdout:
        common["holdout"] = True
    elif a.train_noval:  # the test read with the models the sweep chose on (squeezed without the val share)
        common["train_noval"] = True
    best = merge_best(a.best.split(",")) if a.best else {}
    prev = json.load(open(a.reuse)) if a.reuse else None
    seeds = tuple(int(s) for s in a.seeds.split(","))
    teacher_digest = weights_digest(load_checkpoint(a.teacher))
    result = {"benchmark": "size_study", "dataset": a.dataset,
              "command": "python benchmarks/size_study.py " + " ".join(sys.argv[1:]), "commit": commit(),
              "machine": machine(), "ipc": a.ipc, "seeds": list(seeds), "model_seed": 0,
              "train_noval": a.train_noval, "teacher": a.teacher, "teacher_digest": teacher_digest,
              "best": a.best, "rows": [], "missing": []}

    def spec(method: str, overrides: dict) -> TableSpec:
        return TableSpec(a.dataset, a.work, (method,), (a.ipc,), seeds, {**common, **overrides}, hlr=False,
                         model_seed=0)

    random = {s: run_cell(spec("random", {}), "random", a.ipc, s) for s in seeds}
    result["rows"].append({**row("-", "random", random, random, {}), "teacher_digest": teacher_digest})
    atomic_write_json(a.json, result)
    archs = a.archs.split(",")
    methods = a.methods.split(",")
    result["missing"] += [{"arch": arch, "method": method, "why": "not in this run's --archs or --methods"}
                          for arch in ARCHS for method in METHODS if arch not in archs or method not in methods]
    for arch in archs:
        for method in (m for m in METHODS if m in methods):
            settings = best_settings(best, arch, method)
            cells = spec(method, {"arch": arch, **settings})
            cfg = cells.config(method, a.ipc, 0, a.work)
            recover = json.loads(json.dumps(cfg.to_dict()["recover"]))
            old = prev and reusable_row(prev, arch, method, recover, random, a.teacher, teacher_digest, result)
            if old:
                result["rows"].append(old)
                continue
            backbone = plan_models(cfg).backbone.path
            if not os.path.isfile(backbone):  # not squeezed yet (a long job of its own): the row waits, said so
                result["missing"].append({"arch": arch, "method": method, "why": f"{backbone} is not there yet"})
                continue
            reports = {s: run_cell(cells, method, a.ipc, s) for s in seeds}
            result["rows"].append({**row(arch, method, reports, random, settings), "teacher_digest": teacher_digest})
            atomic_write_json(a.json, result)  # every finished cell is kept, whatever comes next
    atomic_write_json(a.json, result)
    return result


def markdown(res: dict) -> str:
    """The study's page: top-1 and IOR per (recovery model, method) with the settings each ran at, then what
    each size costs, then what is missing."""
    def ms(d, digits=1):
        return f"{d['mean']:,.{digits}f} ± {d['std']:,.{digits}f}" if d else "–"

    rows = res["rows"]
    on = next((r["evaluated_on"] for r in rows), "?")
    teacher = next((r["teacher"] for r in rows), res.get("teacher"))
    out = [f"# {res['dataset']}: recovery-model size, scdd (SSL) against sre2l (supervised)", "",
           f"Top-1 on the {on} split, IPC {res['ipc']}, seeds {', '.join(map(str, res['seeds']))} (IOR paired "
           f"by seed with the random subset); every row relabelled by one teacher, "
           f"`{os.path.basename(str(teacher))}`."
           + (" Models (recovery and teacher) squeezed on the training split less its validation share: the "
              "ones the sweep chose settings with." if res.get("train_noval") else ""), "",
           "| recovery model | method | BN coef | BN weights | settings from | top-1 | IOR | top-1 per seed |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "random":
            coef = weights = src = "–"
        else:
            coef, weights = f"{r['recover']['bn_coef']:.3g}", r["recover"]["bn_weights"]
            src = "sweep" if r["chosen_by_sweep"] else "preset"
        out.append(f"| {r['arch']} | {r['method']} | {coef} | {weights} | {src} | {ms(r['top1'])} | "
                   f"{ms(r.get('ior'))} | {', '.join(f'{v:.1f}' for v in r['top1']['values'])} |")
    out += ["", "What each size costs (seconds on the machine below; recover and post-train a cell, mean over "
            "seeds; recover: the shards' own seconds summed, post-train: the student's run, each over every "
            "process that worked on the cell):", "",
            "| recovery model | method | squeeze s | backbone top-1 (squeeze) | recover s | image x iterations / s "
            "| post-train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "random":
            continue
        sq = f"{r['squeeze_seconds']:,.0f}" if r.get("squeeze_seconds") else "not recorded"
        probe = f"{r['backbone_val_top1']:.1f}" if r.get("backbone_val_top1") is not None else "–"
        out.append(f"| {r['arch']} | {r['method']} | {sq} | {probe} | {ms(r['recover_seconds'], 0)} | "
                   f"{r['recover_img_iters_per_s']:g} | {ms(r['posttrain_seconds'], 0)} |")
    out += ["", "Backbone top-1 is what its squeeze reported: on the validation share when a sweep (`--holdout`) "
            "squeezed it, on the test split when `squeeze --train-noval` did (the checkpoint does not say which)."]
    reused = [r for r in rows if r.get("reused_from")]
    if reused:
        out += ["", "Measured by an earlier run of this study and reused, not run again (the same teacher, "
                f"settings and split, and this run's random subset scored within {REUSE_RANDOM_TOLERANCE:g} of "
                "that run's at every seed): "
                + ", ".join(f"{r['arch']} {r['method']} (commit {str(r['reused_from'])[:7]}"
                            + (f", random subset {r['random_drift']:g} apart at most)" if "random_drift" in r
                               else ")") for r in reused)
                + ". Their IOR is paired with that run's random subset."]
    if res.get("missing"):
        out += ["", "Missing:"] + [f"- {m['arch']} {m['method']}: {m['why']}" for m in res["missing"]]
    mach = res.get("machine") or {}
    cpu = f" {mach['cpu_model']} ({', '.join(mach.get('cpu_isa', [])) or 'no AVX2'})," if mach.get("cpu_model") else ""
    out += ["", f"Machine: {mach.get('arch', '?')},{cpu} {mach.get('cpu_count', '?')} CPUs, GPUs: "
            f"{', '.join(mach.get('gpus') or []) or 'none'}, torch {mach.get('torch', '?')}; commit "
            f"{res.get('commit')}.", "", "```bash", res["command"], "```"]
    return "\n".join(out) + "\n"


def plot(res: dict, out: str) -> None:
    """Top-1 against recovery-model size, scdd and sre2l with seed error bars, the random subset dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["method"] != "random"]
    archs = [a for a in ARCHS if any(r["arch"] == a for r in rows)]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    # the two methods a little apart on x: equal means would otherwise hide one line and its error bars
    for method, color, dx in (("sre2l", "tab:blue", -0.04), ("scdd", "tab:orange", 0.04)):
        got = [(archs.index(r["arch"]) + dx, r) for r in rows if r["method"] == method and r["arch"] in archs]
        ax.errorbar([x for x, _ in got], [r["top1"]["mean"] for _, r in got], [r["top1"]["std"] for _, r in got],
                    marker="o", capsize=4, color=color, label=f"{method} ({'SSL' if method == 'scdd' else 'supervised'}"
                                                          " recovery model)")
    rnd = next(r for r in res["rows"] if r["method"] == "random")["top1"]
    ax.axhline(rnd["mean"], ls="--", color="tab:gray", label=f"random real subset ({rnd['mean']:.1f})")
    ax.set_xticks(range(len(archs)), archs)
    ax.set_xlabel("recovery model (width 0.25)")
    ax.set_ylabel(f"student top-1 (%, {rows[0]['evaluated_on'] if rows else ''})")
    ax.set_title(f"{res['dataset']}, IPC {res['ipc']}, seeds {','.join(map(str, res['seeds']))}, one teacher",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--teacher", required=True, help="the one outside teacher of every cell")
    ap.add_argument("--models-dir", required=True, help="where the squeezed recovery models are (and go)")
    ap.add_argument("--best", default=None,
                    help="sweeps' best.json files, comma-separated (their settings per arch and method)")
    ap.add_argument("--reuse", default=None,
                    help="an earlier run's JSON: its rows that measured the same cells are kept, not run again")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--methods", default=",".join(METHODS), help="run these methods' rows only (one whose sweep "
                                                                  "has not finished waits)")
    ap.add_argument("--width", type=float, default=None, help="(the preset's unless given)")
    ap.add_argument("--ipc", type=int, default=None, help="(the preset's unless given)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--holdout", action="store_true", help="top-1 on the validation share (the test split unread)")
    ap.add_argument("--train-noval", action="store_true",
                    help="top-1 on the test split with models trained on train less its validation share (the "
                         "sweep's own models, found by their cached names: nothing is squeezed again)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--md", default=None, help="the page: both tables (top-1 and IOR, costs) and what is missing")
    a = ap.parse_args()
    bad = [m for m in a.methods.split(",") if m not in METHODS]
    if bad:
        print(f"size_study: error: --methods: {', '.join(bad)} is not one of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    a.ipc = a.ipc or _preset(a, "ipc")
    a.width = a.width or _preset(a, "width")
    try:
        res = run(a)
    except ScddError as e:  # a cell another process is computing, a bad setting: one line, the JSON kept
        print(f"size_study: error: {e}", file=sys.stderr)
        return 2
    if a.plot and len(res["rows"]) > 1:
        plot(res, a.plot)
    if a.md:
        atomic_write_bytes(a.md, markdown(res).encode())
    print(json.dumps([{k: r.get(k) for k in ("arch", "method", "top1", "ior")} for r in res["rows"]], default=str))
    return 0


def _preset(a: argparse.Namespace, key: str):
    from scdd_ray.config import build_config

    return getattr(build_config({"dataset": a.dataset, "data_dir": a.data_dir}, run=False), key)


if __name__ == "__main__":
    sys.exit(main())
