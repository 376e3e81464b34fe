"""`scdd-ray bench table`: does a distilled set beat a random real subset?

Every (method, IPC, seed) cell is a full `distill` run, and every cell of a
seed is relabelled by the same teacher file and post-trained the same way:
its models are those `distill` would use (backbones.resolve_models), with
the table's model seed, cached once in WORK/models and shared by the cells
(a supervised model of the arch, unless `teacher` names one; the SSL
backbone of scdd is shared by its IPCs). Beside top-1 the table gives
DD-Ranking's two metrics:

- IOR (improvement over random): top-1 of the distilled set minus top-1 of
  the random real subset of the same IPC, same seed, teacher and post-train;
- HLR (hard-label recovery): top-1 of the student trained on the whole
  training split with hard labels minus top-1 of the student trained on the
  distilled set with hard labels (cross entropy on its classes, no teacher),
  both with the cell's post-train settings, the former for `full_epochs`.
  With `hlr_reference` "teacher" the whole-data hard-label model is the
  seed's supervised teacher instead (same arch, trained on the whole
  training split with cross entropy, by the squeeze recipe): on a CPU a
  whole-data student at the post-train settings costs more than the table.

Cells resume from what they wrote (report.json, hard.json); `part` (i, n)
runs every n-th cell so several processes share a table, and models shared
between cells are squeezed under a file lock.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..backbones import resolve_models
from ..config import build_distill_config
from ..core.configs import fingerprint_view
from ..core.evaluation import top1
from ..core.posttrain import PostTrainer
from ..data import dataset_info
from ..locks import locked
from ..methods import TABLE
from ..pipeline import distill
from ..store.atomic import atomic_write_bytes, atomic_write_json
from ..store.shards import ShardStore
from .cells import read_current, settings_key, suffix

log = logging.getLogger("scdd_ray")
HLR_REFERENCES = ("student", "teacher")


@dataclass(frozen=True)
class TableSpec:
    dataset: str
    work: str
    methods: tuple[str, ...] = TABLE
    ipcs: tuple[int, ...] = (1, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: dict = field(default_factory=dict)  # DistillConfig fields (flat or section.name) for every cell
    full_epochs: int = 30  # epochs of the whole-training-split hard-label student (HLR)
    hlr: bool = True
    hlr_reference: str = "student"  # HLR_REFERENCES
    # Squeeze the shared models once with this seed for every cell (as the authors recover from one
    # pretrained model); None: each seed squeezes its own, so the spread includes the models' own.
    model_seed: int | None = None

    def suffix(self, method: str | None = None) -> str:
        """Settings other than the preset's name the cells, so tables with other settings never collide.

        Recover settings do not touch a random subset: tables that differ only
        in them share their `random` cells. Relabelling and post-training do not
        touch the distilled set: tables that differ only in them share their
        cells' sets, and name the cells' reports apart (`variant`)."""
        return suffix({k: v for k, v in self.overrides_for(method).items() if not _relabels(k)})

    def variant(self, method: str | None = None) -> str:
        """The relabelling and post-train settings other than the preset's ('' if none): they name a cell's
        report (`report-table<variant>.json`) within the cell that holds its distilled set."""
        return suffix({k: v for k, v in self.overrides_for(method).items() if _relabels(k)})

    def overrides_for(self, method: str | None) -> dict:
        """The overrides that apply to `method`'s cells (a random subset has no recover stage)."""
        return {k: v for k, v in self.overrides.items() if not (method == "random" and k.startswith("recover."))}

    def models_seed(self, seed: int) -> int:
        return seed if self.model_seed is None else self.model_seed

    def config(self, method: str, ipc: int, seed: int, out: str, **extra):
        given = {"num_workers": 1, "models_dir": os.path.join(self.work, "models"), **self.overrides_for(method),
                 "method": method, "ipc": ipc, "seed": seed}
        return build_distill_config(self.dataset, out, {**given, **extra})


def _relabels(key: str) -> bool:
    """Whether a setting decides only how a distilled set is relabelled and post-trained, not the set."""
    return key.startswith("posttrain.") or key == "teacher"


def cells(spec: TableSpec) -> list[tuple[str, int, int]]:
    return [(m, ipc, s) for s in spec.seeds for ipc in spec.ipcs for m in spec.methods]


def cell_dir(spec: TableSpec, method: str, ipc: int, seed: int) -> str:
    models = "" if spec.models_seed(seed) == seed else f"-models{spec.models_seed(seed)}"
    name = f"{spec.dataset}-{method}-ipc{ipc}-seed{seed}{models}{spec.suffix(method)}"
    return os.path.join(spec.work, "cells", name)


def cell_models(spec: TableSpec, method: str, ipc: int, seed: int) -> dict:
    """The backbone and teacher files of a cell (squeezed first if missing): those `distill` resolves for the
    cell with the table's model seed, so every cell of that seed shares one teacher file."""
    cfg = spec.config(method, ipc, spec.models_seed(seed), os.path.join(spec.work, "models"))
    device = torch.device("cuda" if cfg.num_gpus and torch.cuda.is_available() else "cpu")
    info = dataset_info(cfg.dataset, cfg.data_dir, cfg.image_size, **cfg.data_options())
    models = resolve_models(cfg, info, device)
    return {"teacher": models.teacher_path, **({"backbone": models.backbone_path} if models.backbone_path else {})}


def run_cell(spec: TableSpec, method: str, ipc: int, seed: int) -> dict:
    """The cell's distill report (run unless it exists). A post-train variant of a cell distills nothing
    again: `distill` resumes the cell's run, whose finished shards are those of every variant (post-train
    settings are not in its fingerprint), and trains the variant's student."""
    out = cell_dir(spec, method, ipc, seed)
    path = report_path(spec, method, ipc, seed)
    report = read_current(path, cell_key(spec, method, ipc, seed))
    if report is None:
        report = distill.run(distill.prepare(spec.config(method, ipc, seed, out,
                                                         **cell_models(spec, method, ipc, seed))))
        report = {**report, "cell_settings": cell_key(spec, method, ipc, seed)}  # its models exist now
        atomic_write_json(path, report)  # the run's own report.json is its latest post-train's
    return report


def cell_key(spec: TableSpec, method: str, ipc: int, seed: int) -> dict:
    """The cell's settings key, with the model files of the table's model seed that `cell_models` resolves."""
    models = spec.config(method, ipc, spec.models_seed(seed), os.path.join(spec.work, "models"))
    return settings_key(spec.config(method, ipc, seed, cell_dir(spec, method, ipc, seed)), models)


def report_path(spec: TableSpec, method: str, ipc: int, seed: int) -> str:
    """The report the table reads for a cell: one per post-train variant of the cell's distilled set."""
    return os.path.join(cell_dir(spec, method, ipc, seed), f"report-table{spec.variant(method)}.json")


def _hard_student(cfg, images: torch.Tensor, labels: torch.Tensor, test, epochs: int) -> float:
    """Top-1 on `test` of the cell's student trained on (images, labels) by cross entropy, in process."""
    pcfg = dataclasses.replace(cfg.posttrain, labels="hard", epochs=epochs)
    device = torch.device("cuda" if cfg.num_gpus and torch.cuda.is_available() else "cpu")
    trainer = PostTrainer(pcfg, images.to(device), None, test.info, image_size=cfg.image_size,
                          small_input=cfg.small_input, seed=cfg.seed, labels=labels)
    trainer.fit()
    return top1(trainer.evaluated(), test, test.info.mean, test.info.std, device)


def run_hard_cell(spec: TableSpec, method: str, ipc: int, seed: int) -> float:
    """Hard-label top-1 of the cell's distilled set (its own post-train budget)."""
    out = cell_dir(spec, method, ipc, seed)
    path = os.path.join(out, f"hard{spec.variant(method)}.json")
    cfg = spec.config(method, ipc, seed, out)
    key = cell_key(spec, method, ipc, seed)
    result = read_current(path, key)
    if result is None:
        images, cls, _ = ShardStore(os.path.join(out, "distilled")).read()
        t0 = time.perf_counter()
        acc = _hard_student(cfg, images, torch.from_numpy(cls), cfg.split("test"), cfg.posttrain.epochs)
        result = {"hard_top1": acc, "seconds": time.perf_counter() - t0, "cell_settings": key}
        atomic_write_json(path, result)
    return result["hard_top1"]


def run_full_hard(spec: TableSpec, seed: int) -> float:
    """Hard-label top-1 of a student trained on the whole training split for `full_epochs`."""
    cfg = spec.config(spec.methods[0], spec.ipcs[0], seed, "unused")
    path = os.path.join(spec.work, "full", f"{spec.dataset}-hard-e{spec.full_epochs}-seed{seed}"
                                           f"{spec.suffix('random')}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    key = {"posttrain": fingerprint_view(cfg.posttrain)}  # a whole-data student has no recover stage
    with locked(path + ".lock"):
        result = read_current(path, key)
        if result is None:
            train = cfg.split("train")
            t0 = time.perf_counter()
            acc = _hard_student(cfg, train.images, train.labels, cfg.split("test"), spec.full_epochs)
            result = {"hard_top1": acc, "epochs": spec.full_epochs, "images": len(train),
                      "seconds": time.perf_counter() - t0, "cell_settings": key}
            atomic_write_json(path, result)
    return result["hard_top1"]


def run_table(spec: TableSpec, part: tuple[int, int] = (1, 1)) -> dict | None:
    """Run this part's cells; when every cell of the table is done, return (and write) the table."""
    i, n = part
    todo = cells(spec)
    for k, (method, ipc, seed) in enumerate(todo):
        if k % n == i - 1:
            run_cell(spec, method, ipc, seed)
            if spec.hlr:
                run_hard_cell(spec, method, ipc, seed)
    if spec.hlr and spec.hlr_reference == "student":
        for k, seed in enumerate(spec.seeds):
            if k % n == i - 1:
                run_full_hard(spec, seed)
    missing = [c for c in todo if read_current(report_path(spec, *c), cell_key(spec, *c)) is None]
    if missing:
        log.info("table: %d of %d cells done; the other parts still run %s", len(todo) - len(missing), len(todo),
                 ", ".join(f"{m}/ipc{c}/seed{s}" for m, c, s in missing[:5]))
        return None
    return summarize(spec)


def full_hard_top1(spec: TableSpec, seed: int, reports: dict) -> float:
    """HLR's whole-data hard-label top-1 for `seed` (`reports`: each cell's distill report)."""
    if spec.hlr_reference == "student":
        return run_full_hard(spec, seed)
    return next(r["teacher_top1"] for (_, _, s), r in reports.items() if s == seed)


def _mean_std(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "values": vals}


def summarize(spec: TableSpec) -> dict:
    """One row per (method, IPC): top-1, IOR and HLR as mean and std over seeds (paired by seed)."""
    top = {c: run_cell(spec, *c) for c in cells(spec)}
    hard = {c: run_hard_cell(spec, *c) for c in cells(spec)} if spec.hlr else {}
    full = {s: full_hard_top1(spec, s, top) for s in spec.seeds} if spec.hlr else {}
    rows = []
    for ipc in spec.ipcs:
        for method in spec.methods:
            keys = [(method, ipc, s) for s in spec.seeds]
            row = {"method": method, "ipc": ipc, "evaluated_on": top[keys[0]]["evaluated_on"],
                   "top1": _mean_std([top[k]["top1"] for k in keys]),
                   "teacher_top1": _mean_std([top[k]["teacher_top1"] for k in keys]),
                   "teachers": sorted({top[k]["teacher"] for k in keys}),
                   "recover_seconds": _mean_std([top[k]["recover_seconds"] for k in keys])}
            if "random" in spec.methods:
                row["ior"] = _mean_std([top[k]["top1"] - top[("random", ipc, k[2])]["top1"] for k in keys])
            if spec.hlr:
                row["hard_top1"] = _mean_std([hard[k] for k in keys])
                row["hlr"] = _mean_std([full[k[2]] - hard[k] for k in keys])
            rows.append(row)
    return {"benchmark": "table", "dataset": spec.dataset, "methods": list(spec.methods), "ipcs": list(spec.ipcs),
            "seeds": list(spec.seeds), "overrides": spec.overrides, "hlr_reference": spec.hlr_reference,
            "model_seed": spec.model_seed,
            "full_epochs": spec.full_epochs if spec.hlr_reference == "student" else None,
            "full_hard_top1": full, "rows": rows}


def markdown(table: dict) -> str:
    def ms(d):
        return f"{d['mean']:.1f} ± {d['std']:.1f}"

    head = "| method | IPC | top-1 | IOR | HLR | hard-label top-1 | teacher top-1 | top-1 per seed |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in table["rows"]:
        lines.append(f"| {r['method']} | {r['ipc']} | {ms(r['top1'])} | {ms(r['ior']) if 'ior' in r else '–'} | "
                     f"{ms(r['hlr']) if 'hlr' in r else '–'} | {ms(r['hard_top1']) if 'hard_top1' in r else '–'} | "
                     f"{ms(r['teacher_top1'])} | {', '.join(f'{v:.1f}' for v in r['top1']['values'])} |")
    return "\n".join(lines) + "\n"


def write_table(table: dict, json_path: str, md_path: str | None) -> None:
    atomic_write_json(json_path, table)
    if md_path:
        atomic_write_bytes(md_path, markdown(table).encode())
