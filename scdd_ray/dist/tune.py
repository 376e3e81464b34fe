"""Ray Tune sweeps of the recover settings across recovery-model sizes.

One trial = recover a distilled set with the sampled settings + a short
post-train, scored by top-1 on the VALIDATION split carved from the real
training data. The test split is never read by a trial: it is read once per
(arch, method), after the sweep, to measure the best configuration's student.

Backbones (and teachers) are squeezed on `train-noval` before the sweep, so
nothing a trial sees was trained on the validation images either.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ..config import SqueezeSetup
from ..core.evaluation import top1
from ..core.shards import plan_shards, recover_shard
from ..core.training import PostTrainer, build_teacher
from ..data import ImageSet, load_split
from ..errors import ConfigError, EngineError
from ..models import Checkpoint, create_model, frozen, load_checkpoint, load_state_file, small_input
from ..backbones import backbone_name, load_checkpoint_arg, squeeze_and_save
from ..store import atomic_write_bytes, atomic_write_json
from ..tune_config import Param, TuneConfig, recover_for
from .cluster import cluster_resources, connect, worker_error

log = logging.getLogger("scdd_ray")
METRIC = "val_top1"
STATE_FILE = "trial.pt"


# --- backbones -----------------------------------------------------------------------

def squeeze_method(cfg: TuneConfig, method: str) -> str:
    """scdd recovers from the SSL backbone of the YAML's squeeze section, sre2l from a supervised one."""
    return cfg.squeeze.method if method == "scdd" else "supervised"


def backbone_path(out: str, cfg: TuneConfig, method: str, arch: str) -> str:
    return os.path.join(out, "backbones", backbone_name(squeeze_method(cfg, method), arch, cfg.width, cfg.image_size,
                                                        cfg.squeeze.epochs, cfg.seed, split="train-noval"))


def task_device(cfg: TuneConfig) -> torch.device:
    """The device of a squeeze task or trial: its GPU share, or the CPU when it asked for none.

    A task given a GPU that torch cannot see fails (one line, in Tune's error) rather than running
    the GPU job on a CPU slot for hours."""
    if cfg.resources.gpu <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EngineError(f"`resources.gpu` {cfg.resources.gpu:g}: Ray gave this task a GPU but torch "
                          f"{torch.__version__} sees no CUDA device")
    return torch.device("cuda")


def _squeeze_one(cfg: TuneConfig, method: str, arch: str, path: str, threads: int) -> str:
    torch.set_num_threads(threads)
    train = load_split(cfg.dataset, "train-noval", cfg.data_dir, cfg.image_size)
    setup = SqueezeSetup(cfg.dataset, arch, cfg.width, cfg.image_size,
                         dataclasses.replace(cfg.squeeze, method=squeeze_method(cfg, method)))
    device = task_device(cfg)
    squeeze_and_save(path, setup, train, device, cfg.seed, meta={"split": "train-noval"})
    return path


def prepare_backbones(cfg: TuneConfig, out: str, info) -> dict[tuple[str, str], Checkpoint]:
    """One backbone per (method, arch): the YAML's `backbones`, else trained on train-noval (cached,
    missing ones squeezed as Ray tasks in parallel)."""
    todo, paths, given = [], {}, {}
    for method in cfg.methods:
        for arch in cfg.archs:
            user = cfg.backbones.get(f"{method}/{arch}")
            if user:
                ck = load_checkpoint_arg(user, f"backbones.{method}/{arch}", info, cfg.image_size)
                if ck.arch != arch or ck.num_classes != info.num_classes or ck.image_size != cfg.image_size:
                    raise ConfigError(f"backbones.{method}/{arch}", f"{user} is a {ck.arch} for {ck.num_classes} "
                                      f"classes at {ck.image_size}px; the sweep needs {arch}, {info.num_classes} "
                                      f"classes, {cfg.image_size}px")
                given[(method, arch)] = ck
                continue
            p = backbone_path(out, cfg, method, arch)
            paths[(method, arch)] = p
            if not os.path.isfile(p):
                todo.append((method, arch, p))
    if todo:
        cpus = max(1, int(cfg.resources.cpu))
        task = ray.remote(num_cpus=cpus, num_gpus=min(1.0, cfg.resources.gpu) if cfg.resources.gpu else 0)(_squeeze_one)
        log.info("squeezing %d backbone(s) on train-noval: %s", len(todo), ", ".join(f"{m}/{a}" for m, a, _ in todo))
        ray.get([task.remote(cfg, m, a, p, cpus) for m, a, p in todo])
    return {**{k: load_checkpoint(p) for k, p in paths.items()}, **given}


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

    space = {k: dist(p) for k, p in cfg.search.items()}
    space["arch"] = tune.grid_search(list(cfg.archs))
    space["method"] = tune.grid_search(list(cfg.methods))
    return space


def sampled(config: dict, cfg: TuneConfig) -> dict:
    return {k: config[k] for k in cfg.search}


def recover_images(ckpt: Checkpoint, cfg: TuneConfig, rcfg, device, train: ImageSet | None) -> torch.Tensor:
    """All synthetic images of the trial (uint8), in process: a trial owns its CPU slot or GPU share."""
    model = frozen(ckpt.build().to(device))
    shards = plan_shards(ckpt.num_classes, cfg.ipc, rcfg.classes_per_batch, rcfg.ipc_per_shard)
    images, labels = [], []
    for shard in shards:
        res, cls, _ = recover_shard(model, shard, rcfg, ckpt.mean, ckpt.std, cfg.image_size, cfg.seed, device, train)
        images.append(res.images)
        labels += cls
    return torch.cat(images), torch.tensor(labels)


def train_and_validate(images: torch.Tensor, teacher_ckpt: Checkpoint, val: ImageSet, cfg: TuneConfig, device,
                       report) -> float:
    """Short post-train (the one training loop); `report(epoch, val_top1, student)` after every
    `eval_every` epochs and at the end. Returns the last validation top-1."""
    info = val.info
    teacher = build_teacher(teacher_ckpt, info, device)
    trainer = PostTrainer(cfg.posttrain, images.to(device), teacher, info, image_size=cfg.image_size,
                          small_input=small_input(cfg.image_size), seed=cfg.seed)
    acc = [0.0]

    def on_epoch(e1: int, running, steps: int) -> None:
        if e1 % cfg.eval_every == 0 or e1 == cfg.posttrain.epochs:
            acc[0] = top1(trainer.student, val, info.mean, info.std, device)
            report(e1, acc[0], trainer.student)

    trainer.fit(on_epoch=on_epoch)
    return acc[0]


def trial(config: dict, cfg: TuneConfig, backbones: dict, val: ImageSet, train: ImageSet | None) -> None:
    """The Tune function trainable."""
    run_trial(config, cfg, backbones, val, train, tune.report, tune.Checkpoint)


def run_trial(config: dict, cfg: TuneConfig, backbones: dict, val: ImageSet, train: ImageSet | None, report_fn,
              checkpoint_cls) -> None:
    """Recover with the sampled settings, post-train, report validation top-1.

    Its only data are `val` (the objective) and `train` (train-noval, for
    `init` real); it has no way to reach the test split.
    """
    threads = max(1, int(cfg.resources.cpu))
    torch.set_num_threads(threads)
    device = task_device(cfg)
    ckpt = backbones[(config["method"], config["arch"])]
    rcfg = recover_for(cfg.recover, sampled(config, cfg))
    t0 = time.perf_counter()
    images, labels = recover_images(ckpt, cfg, rcfg, device, train if rcfg.init == "real" else None)
    recover_seconds = time.perf_counter() - t0

    def report(epoch: int, acc: float, student) -> None:
        metrics = {METRIC: acc, "epoch": epoch, "recover_seconds": recover_seconds}
        if epoch < cfg.posttrain.epochs:
            report_fn(metrics)
            return
        with tempfile.TemporaryDirectory() as d:  # the final student, for the one test evaluation after the sweep
            torch.save({"student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                        "images": images.cpu(), "labels": labels, "recover": dataclasses.asdict(rcfg)},
                       os.path.join(d, STATE_FILE))
            report_fn(metrics, checkpoint=checkpoint_cls.from_directory(d))

    train_and_validate(images, ckpt, val, cfg, device, report)


# --- the sweep --------------------------------------------------------------------------

class PerCellASHA(FIFOScheduler):
    """ASHA run separately within each (arch, method) cell of the grid.

    One ASHA over the whole sweep would compare a ResNet-50 trial with a
    ResNet-18 one and could stop every trial of a weaker cell early, leaving
    that cell with no finished configuration (it did, in a first digits
    sweep). Successive halving is only meant to rank settings of one cell.
    """

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float):
        super().__init__()
        self._args = dict(time_attr="epoch", max_t=max_t, grace_period=grace_period,
                          reduction_factor=reduction_factor)
        self._cells: dict[tuple, ASHAScheduler] = {}
        self._props: tuple = (None, None)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._props = (metric, mode)
        return all(s.set_search_properties(metric, mode) for s in self._cells.values())

    def _cell(self, trial) -> ASHAScheduler:
        key = (trial.config.get("arch"), trial.config.get("method"))
        if key not in self._cells:
            sched = ASHAScheduler(**self._args)
            sched.set_search_properties(*self._props)
            self._cells[key] = sched
        return self._cells[key]

    def on_trial_add(self, tc, trial):
        self._cell(trial).on_trial_add(tc, trial)

    def on_trial_result(self, tc, trial, result):
        return self._cell(trial).on_trial_result(tc, trial, result)

    def on_trial_complete(self, tc, trial, result):
        self._cell(trial).on_trial_complete(tc, trial, result)

    def on_trial_error(self, tc, trial):
        self._cell(trial).on_trial_error(tc, trial)

    def on_trial_remove(self, tc, trial):
        self._cell(trial).on_trial_remove(tc, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{a}/{m}: {s.debug_string()}" for (a, m), s in self._cells.items())


def run_sweep(cfg: TuneConfig, out: str, num_samples: int | None = None, address: str | None = None) -> dict:
    """Run (or resume) the sweep under `out`, then write best.json and summary.md."""
    connect(address)
    check_resources(cfg)
    os.makedirs(out, exist_ok=True)
    val = load_split(cfg.dataset, "val", cfg.data_dir, cfg.image_size)
    train = load_split(cfg.dataset, "train-noval", cfg.data_dir, cfg.image_size)
    backbones = prepare_backbones(cfg, out, val.info)
    storage, name = os.path.abspath(out), "tune"
    exp_dir = os.path.join(storage, name)
    trainable = tune.with_resources(
        tune.with_parameters(trial, cfg=cfg, backbones=backbones, val=val, train=train),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    t0 = time.perf_counter()
    if tune.Tuner.can_restore(exp_dir):
        log.info("resuming the sweep in %s", exp_dir)
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if cfg.scheduler.name == "asha":
            scheduler = PerCellASHA(cfg.posttrain.epochs, cfg.scheduler.grace_period,
                                    cfg.scheduler.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                        num_samples=num_samples or cfg.num_samples,
                                        max_concurrent_trials=cfg.max_concurrent or None),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=1)))
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    if grid.num_terminated + grid.num_errors < len(grid) or len(grid) < expected_trials(cfg, num_samples):
        # Ctrl-C (or a lost driver): Tune saved its state; best.json is written only for a finished sweep.
        raise KeyboardInterrupt
    if grid.num_errors:
        first = grid.errors[0]
        log.warning("%d of %d trials failed; the first: %s", grid.num_errors, len(grid), worker_error(first))
    if grid.num_errors == len(grid):
        raise EngineError(f"every trial of the sweep failed; see {exp_dir}")
    return summarize(grid, cfg, out, seconds)


def expected_trials(cfg: TuneConfig, num_samples: int | None = None) -> int:
    """Trials of a complete sweep: samples x archs x methods x every `grid` parameter's values."""
    n = (num_samples or cfg.num_samples) * len(cfg.archs) * len(cfg.methods)
    for p in cfg.search.values():
        if p.kind == "grid":
            n *= len(p.args)
    return n


def summarize(grid, cfg: TuneConfig, out: str, seconds: float) -> dict:
    """best.json: best config per (arch, method) by validation top-1; summary.md: its test top-1, read once."""
    rows = []
    for r in grid:
        if r.metrics is None or METRIC not in (r.metrics or {}):
            continue
        rows.append(r)
    test = load_split(cfg.dataset, "test", cfg.data_dir, cfg.image_size)  # the only read of the test split
    device = torch.device("cuda" if cfg.resources.gpu > 0 and torch.cuda.is_available() else "cpu")
    if cfg.resources.gpu > 0 and device.type == "cpu":
        log.warning("no CUDA device on the driver: the test top-1 of the best configurations runs on its CPU")
    best: dict = {}
    for arch in cfg.archs:
        for method in cfg.methods:
            cell = [r for r in rows if r.config["arch"] == arch and r.config["method"] == method]
            full = [r for r in cell if r.metrics["epoch"] == cfg.posttrain.epochs and r.checkpoint is not None]
            if not full:
                continue
            top = max(full, key=lambda r: r.metrics[METRIC])
            with top.checkpoint.as_directory() as d:
                state = load_state_file(os.path.join(d, STATE_FILE))
            student = create_model(cfg.posttrain.student, test.info.num_classes, cfg.posttrain.student_width,
                                   small_input(cfg.image_size))
            student.load_state_dict(state["student"])
            test_acc = top1(student.to(device), test, test.info.mean, test.info.std, device)
            vals = [r.metrics[METRIC] for r in full]
            best[f"{arch}/{method}"] = {
                "arch": arch, "method": method, "config": {k: top.config[k] for k in cfg.search},
                "recover": state["recover"], "val_top1": round(top.metrics[METRIC], 3),
                "test_top1": round(test_acc, 3), "trials": len(cell), "trials_finished": len(full),
                "val_top1_finished_median": round(statistics.median(vals), 3), "trial_path": top.path,
            }
    result = {"name": cfg.name, "dataset": cfg.dataset, "metric": METRIC, "seconds": round(seconds, 1),
              "best": best, "config": json.loads(json.dumps(cfg.to_dict(), default=str))}
    atomic_write_json(os.path.join(out, "best.json"), result)
    lines = [f"Sweep `{cfg.name}` on {cfg.dataset}: best recover settings per recovery model, chosen by "
             f"validation top-1 after {cfg.posttrain.epochs} post-train epochs; test top-1 of that one "
             f"configuration measured once after the sweep.", "",
             "| arch | method | best config | val top-1 | test top-1 | trials (finished) |", "|---|---|---|---|---|---|"]
    for b in best.values():
        conf = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["config"].items())
        lines.append(f"| {b['arch']} | {b['method']} | {conf} | {b['val_top1']:.1f} | {b['test_top1']:.1f} | "
                     f"{b['trials']} ({b['trials_finished']}) |")
    atomic_write_bytes(os.path.join(out, "summary.md"), ("\n".join(lines) + "\n").encode())
    return result


def check_resources(cfg: TuneConfig) -> None:
    """A trial that asks for more than the cluster has would wait forever: refuse it up front."""
    have = cluster_resources()
    if cfg.resources.cpu > have.get("CPU", 0):
        raise ConfigError("resources.cpu", f"a trial asks for {cfg.resources.cpu} CPUs but the Ray cluster has "
                                           f"{have.get('CPU', 0):g}")
    if cfg.resources.gpu > have.get("GPU", 0):
        raise ConfigError("resources.gpu", f"a trial asks for {cfg.resources.gpu} GPUs but the Ray cluster has "
                                           f"{have.get('GPU', 0):g}")


__all__ = ["run_sweep", "trial", "summarize", "prepare_backbones", "search_space", "check_resources", "PerCellASHA"]
