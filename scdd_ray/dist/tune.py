"""Ray Tune sweeps of the recover settings across recovery-model sizes.

One trial = recover a distilled set with the sampled settings + a short
post-train, relabelled by the cell's teacher (the one `distill` would use for
the same configuration: backbones.plan_models), scored by top-1 on the
VALIDATION split carved from the real training data. The test split is never
read by a trial: it is read once per (arch, method), after the sweep, to
measure the best configuration's student.

Each (arch, method) cell is one `Tuner` with its own scheduler, so ASHA ranks
a trial only against trials of its own recovery model. Backbones and teachers
are squeezed on `train-noval` before the sweep (missing ones as Ray tasks in
parallel), so nothing a trial sees was trained on the validation images either.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import statistics
import tempfile
import threading
import time

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from ..backbones import ModelSource, plan_models, resolve_models, squeeze_cached
from ..class_stats import cached_class_statistics
from ..core.evaluation import top1
from ..core.posttrain import PostTrainer, build_teacher
from ..core.shards import plan_shards, recover_shard
from ..data import ImageSet, dataset_info
from ..errors import ConfigError, EngineError
from ..models.checkpoint import Checkpoint, load_state_file
from ..models.factory import create_model, small_input
from ..models.runtime import frozen
from ..schema import DistillConfig
from ..store.atomic import atomic_write_bytes, atomic_write_json
from ..tune_config import Param, TuneConfig, recover_for
from .cluster import cluster_resources, connect, worker_error

log = logging.getLogger("scdd_ray")
METRIC = "val_top1"
STATE_FILE = "trial.pt"


def task_device(cfg: TuneConfig) -> torch.device:
    """The device of a squeeze task or trial: its GPU share, or the CPU when it asked for none.

    A task given a GPU that torch cannot see fails (one line, in Tune's error) rather than running
    the GPU job on a CPU slot for hours."""
    if not cfg.gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EngineError(f"`resources.gpu` {cfg.resources.gpu:g}: Ray gave this task a GPU but torch "
                          f"{torch.__version__} sees no CUDA device")
    return torch.device("cuda")


# --- models ----------------------------------------------------------------------------

def _squeeze_task(cfg: TuneConfig, src: ModelSource, threads: int) -> str:
    torch.set_num_threads(threads)
    squeeze_cached(src, task_device(cfg))
    return src.path


def prepare_models(cfg: TuneConfig, out: str) -> dict[tuple[str, str], tuple[DistillConfig, object]]:
    """(cell configuration, its backbones.Models) per (arch, method): what `distill` would use for the cell;
    the missing squeezed ones trained first as Ray tasks in parallel, each once."""
    cells = {(a, m): cfg.cell(a, m, out) for a in cfg.archs for m in cfg.methods}
    todo = {}
    for cell in cells.values():
        plan = plan_models(cell)
        for src in (plan.backbone, *plan.teachers):
            if src is not None and src.missing:
                todo[src.path] = src
    if todo:
        cpus = max(1, int(cfg.resources.cpu))
        task = ray.remote(num_cpus=cpus, num_gpus=min(1.0, cfg.resources.gpu) if cfg.gpu else 0)(_squeeze_task)
        log.info("squeezing %d model(s) on train-noval: %s", len(todo), ", ".join(map(os.path.basename, todo)))
        try:
            ray.get([task.remote(cfg, src, cpus) for src in todo.values()])
        except ray.exceptions.RayTaskError as e:
            raise EngineError(f"squeezing the sweep's models failed: {worker_error(e)}") from None
    info = dataset_info(cfg.base.dataset, cfg.base.data_dir, cfg.base.image_size, **cfg.base.data_options())
    return {k: (c, resolve_models(c, info, torch.device("cpu"))) for k, c in cells.items()}


# --- one trial -------------------------------------------------------------------------

def search_space(cfg: TuneConfig) -> dict:
    def dist(p: Param):
        if p.kind == "value":
            return p.args[0]
        if p.kind == "grid":
            return tune.grid_search(list(p.args))
        if p.kind == "choice":
            return tune.choice(list(p.args))
        lo, hi = p.args
        return {"loguniform": tune.loguniform, "uniform": tune.uniform}.get(p.kind, tune.randint)(lo, hi)

    return {k: dist(p) for k, p in cfg.search.items()}


def recover_images(ckpt: Checkpoint, cell: DistillConfig, rcfg, device, train: ImageSet | None):
    """All synthetic images of the trial (uint8) and their classes, in process: a trial owns its CPU slot
    or GPU share. Category-aware matching reads the backbone's per-class statistics from the cell's cache
    (gathered by the first trial that needs them)."""
    stats = cached_class_statistics(cell, ckpt, device) if rcfg.class_bn_coef > 0 else None
    model = frozen(ckpt.build().to(device, memory_format=torch.channels_last))
    shards = plan_shards(ckpt.num_classes, cell.ipc, rcfg.classes_per_batch, rcfg.ipc_per_shard)
    images, labels = [], []
    for shard in shards:
        res, cls, _ = recover_shard(model, shard, rcfg, ckpt.mean, ckpt.std, cell.image_size, cell.seed, device,
                                    train, class_stats=stats)
        images.append(res.images)
        labels += cls
    return torch.cat(images), torch.tensor(labels)


def train_and_validate(images: torch.Tensor, teacher_ckpt: Checkpoint, val: ImageSet, cell: DistillConfig,
                       eval_every: int, device, report) -> float:
    """Short post-train (the one training loop) relabelled by `teacher_ckpt`; `report(epoch, val_top1,
    student)` after every `eval_every` epochs and at the end. Returns the last validation top-1."""
    info, pcfg = val.info, cell.posttrain
    teacher = build_teacher(teacher_ckpt, info, device, pcfg)
    trainer = PostTrainer(pcfg, images.to(device), teacher, info, image_size=cell.image_size,
                          small_input=cell.small_input, seed=cell.seed)
    acc = [0.0]

    def on_epoch(e1: int, running, steps: int) -> None:
        if e1 % eval_every == 0 or e1 == pcfg.epochs:
            model = trainer.evaluated()
            acc[0] = top1(model, val, info.mean, info.std, device)
            report(e1, acc[0], model)

    trainer.fit(on_epoch=on_epoch)
    return acc[0]


def trial(config: dict, cfg: TuneConfig, cell: DistillConfig, backbone: Checkpoint, teacher: Checkpoint,
          val: ImageSet, train: ImageSet | None) -> None:
    """The Tune function trainable: recover with the sampled settings, post-train, report validation top-1.

    Its only data are `val` (the objective) and `train` (train-noval, for
    `init` real); it has no way to reach the test split.
    """
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    device = task_device(cfg)
    rcfg = recover_for(cell.recover, config)
    t0 = time.perf_counter()
    images, labels = recover_images(backbone, cell, rcfg, device, train if rcfg.init == "real" else None)
    recover_seconds = time.perf_counter() - t0

    def report(epoch: int, acc: float, student) -> None:
        metrics = {METRIC: acc, "epoch": epoch, "recover_seconds": recover_seconds}
        if epoch < cell.posttrain.epochs:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:  # the final student, for the one test evaluation after the sweep
            torch.save({"student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                        "images": images.cpu(), "labels": labels, "recover": dataclasses.asdict(rcfg)},
                       os.path.join(d, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    train_and_validate(images, teacher, val, cell, cfg.eval_every, device, report)


# --- the sweep --------------------------------------------------------------------------

def cell_name(arch: str, method: str) -> str:
    return f"{arch.replace(':', '_')}-{method}"


def _tuner(cfg: TuneConfig, exp_dir: str, trainable, num_samples: int) -> tune.Tuner:
    """The cell's Tuner: restored from `exp_dir` when a run there can resume, else a new one."""
    if tune.Tuner.can_restore(exp_dir):
        log.info("resuming the sweep cell in %s", exp_dir)
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    s = cfg.scheduler
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.base.posttrain.epochs, grace_period=s.grace_period,
                               reduction_factor=s.reduction_factor) if s.name == "asha" else FIFOScheduler())
    # Seeded by the run seed, so a sweep lost with its folder samples the same settings again, and every
    # cell of one sweep tries the same settings (scdd and sre2l compared setting by setting). Tune only
    # limits concurrency of a searcher it builds itself, so the limit goes to this one directly.
    search = BasicVariantGenerator(random_state=cfg.base.seed, max_concurrent=cfg.max_concurrent)
    return tune.Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, num_samples=num_samples,
                                    search_alg=search),
        run_config=tune.RunConfig(name=os.path.basename(exp_dir), storage_path=os.path.dirname(exp_dir), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=1)))


def run_sweep(cfg: TuneConfig, out: str, num_samples: int | None = None) -> dict | None:
    """Run (or resume) the sweep under `out`, one Tuner per (arch, method) cell, then write best.json and
    summary.md. Returns None when it stopped before every trial finished (Ctrl-C: Tune saved its state, a
    rerun resumes)."""
    connect(cfg.base.address)
    check_resources(cfg)
    os.makedirs(out, exist_ok=True)
    val, train = cfg.base.split("test"), cfg.base.split("train")  # under holdout: val, train-noval
    models = prepare_models(cfg, out)
    t0, grids = time.perf_counter(), {}
    with _StopBetweenCells() as stop:
        for (arch, method), (cell, m) in models.items():
            if stop.requested:
                return None
            exp_dir = os.path.join(os.path.abspath(out), "tune", cell_name(arch, method))
            trainable = tune.with_resources(
                tune.with_parameters(trial, cfg=cfg, cell=cell, backbone=m.backbone, teacher=m.teacher, val=val,
                                     train=train),
                {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
            grid = _tuner(cfg, exp_dir, trainable, num_samples or cfg.num_samples).fit()
            if stop.after_fit() or grid.num_terminated + grid.num_errors < len(grid) \
                    or len(grid) < expected_trials(cfg, num_samples):
                return None  # interrupted: Tune saved the cell's state; best.json is only for a finished sweep
            if grid.num_errors:
                log.warning("%s: %d of %d trials failed; the first: %s", cell_name(arch, method), grid.num_errors,
                            len(grid), worker_error(grid.errors[0]))
            grids[(arch, method)] = grid
    if all(g.num_errors == len(g) for g in grids.values()):
        raise EngineError(f"every trial of the sweep failed; see {os.path.join(out, 'tune')}")
    return summarize(grids, models, cfg, out, time.perf_counter() - t0)


class _StopBetweenCells:
    """Ctrl-C stops the sweep, whether it lands in a cell's Tuner or between two cells.

    Each `Tuner.fit` installs Tune's SIGINT handler over the one in place,
    which on Ctrl-C stops that cell, saves its state and puts the previous
    handler back; when the cell ends without one it leaves its own handler
    installed, so a Ctrl-C between two fits would reach a finished cell and be
    lost. Here a handler of ours is in place before every fit: it records a
    Ctrl-C between fits, and finding it back in place after a fit means Tune
    took a Ctrl-C (a stopped cell's trials can all look finished: its running
    trial is stopped, not left pending).
    """

    def __init__(self):
        self.requested = False
        self._active = threading.current_thread() is threading.main_thread()  # signals: the main thread only
        self._tune_handles = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") in ("", "0")

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def rearm(self) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._handler)

    def after_fit(self) -> bool:
        """Whether a Ctrl-C stopped the sweep (during the fit that just returned, or before it)."""
        if self._active and self._tune_handles and signal.getsignal(signal.SIGINT) == self._handler:
            self.requested = True
        self.rearm()
        return self.requested

    def __enter__(self) -> "_StopBetweenCells":
        if self._active:
            self._previous = signal.getsignal(signal.SIGINT)
        self.rearm()
        return self

    def __exit__(self, *exc) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._previous)


def expected_trials(cfg: TuneConfig, num_samples: int | None = None) -> int:
    """Trials of a complete cell: samples x every `grid` parameter's values."""
    n = num_samples or cfg.num_samples
    for p in cfg.search.values():
        if p.kind == "grid":
            n *= len(p.args)
    return n


def _best(grid, cfg: TuneConfig):
    """(the finished trial with the highest validation top-1, the finished ones, all with metrics)."""
    rows = [r for r in grid if r.metrics and METRIC in r.metrics]
    full = [r for r in rows if r.metrics["epoch"] == cfg.base.posttrain.epochs and r.checkpoint is not None]
    return (max(full, key=lambda r: r.metrics[METRIC]) if full else None), full, rows


def summarize(grids: dict, models: dict, cfg: TuneConfig, out: str, seconds: float) -> dict:
    """best.json: best config per (arch, method) by validation top-1, with the backbone and teacher files the
    cell used; summary.md: its test top-1, read once."""
    test = dataclasses.replace(cfg.base, holdout=False).split("test")  # the only read of the test split
    device = torch.device("cuda" if cfg.gpu and torch.cuda.is_available() else "cpu")
    if cfg.gpu and device.type == "cpu":
        log.warning("no CUDA device on the driver: the test top-1 of the best configurations runs on its CPU")
    best: dict = {}
    for (arch, method), grid in grids.items():
        top, full, rows = _best(grid, cfg)
        if top is None:
            continue
        cell, m = models[(arch, method)]
        with top.checkpoint.as_directory() as d:
            state = load_state_file(os.path.join(d, STATE_FILE))
        student = create_model(cell.posttrain.student, test.info.num_classes, cell.posttrain.student_width,
                               small_input(cell.image_size))
        student.load_state_dict(state["student"])
        test_acc = top1(student.to(device), test, test.info.mean, test.info.std, device)
        vals = [r.metrics[METRIC] for r in full]
        best[f"{arch}/{method}"] = {
            "arch": arch, "method": method, "config": {k: top.config[k] for k in cfg.search},
            "recover": state["recover"], "val_top1": round(top.metrics[METRIC], 3),
            "test_top1": round(test_acc, 3), "trials": len(rows), "trials_finished": len(full),
            "val_top1_finished_median": round(statistics.median(vals), 3), "trial_path": top.path,
            "backbone": m.backbone_path, "teacher": m.teacher_path,
        }
    result = {"name": cfg.name, "dataset": cfg.base.dataset, "metric": METRIC, "seconds": round(seconds, 1),
              "best": best, "config": json.loads(json.dumps(cfg.to_dict(), default=str))}
    atomic_write_json(os.path.join(out, "best.json"), result)
    atomic_write_bytes(os.path.join(out, "summary.md"), summary_markdown(cfg, best).encode())
    return result


def summary_markdown(cfg: TuneConfig, best: dict) -> str:
    lines = [f"Sweep `{cfg.name}` on {cfg.base.dataset}: best recover settings per recovery model, chosen by "
             f"validation top-1 after {cfg.base.posttrain.epochs} post-train epochs; test top-1 of that one "
             f"configuration measured once after the sweep.", "",
             "| arch | method | best config | val top-1 | test top-1 | trials (finished) | teacher |",
             "|---|---|---|---|---|---|---|"]
    for b in best.values():
        conf = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["config"].items())
        lines.append(f"| {b['arch']} | {b['method']} | {conf} | {b['val_top1']:.1f} | {b['test_top1']:.1f} | "
                     f"{b['trials']} ({b['trials_finished']}) | {os.path.basename(b['teacher'])} |")
    return "\n".join(lines) + "\n"


def check_resources(cfg: TuneConfig) -> None:
    """A trial that asks for more than the cluster has would wait forever: refuse it up front."""
    have = cluster_resources()
    if cfg.resources.cpu > have.get("CPU", 0):
        raise ConfigError("resources.cpu", f"a trial asks for {cfg.resources.cpu} CPUs but the Ray cluster has "
                                           f"{have.get('CPU', 0):g}")
    if cfg.resources.gpu > have.get("GPU", 0):
        raise ConfigError("resources.gpu", f"a trial asks for {cfg.resources.gpu} GPUs but the Ray cluster has "
                                           f"{have.get('GPU', 0):g}")


__all__ = ["run_sweep", "trial", "summarize", "prepare_models", "search_space", "check_resources"]
