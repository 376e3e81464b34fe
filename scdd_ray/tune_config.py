"""Sweep definitions read from `tune_configs/*.yaml`, validated before Ray starts.

A sweep file is a base configuration in the schema of every run (top-level
fields such as `dataset`, `width`, `teacher`, and the `squeeze`, `recover`,
`posttrain` sections), resolved through the same preset logic as `distill`
(the dataset's GPU preset when trials ask for a GPU, else its CPU preset),
plus what only a sweep has: a grid over recovery architectures x methods,
and within each cell `num_samples` draws from a search space over recover
settings. Every key is checked here: an unknown key or a bad range is a
ConfigError naming the key, so a typo never silently becomes a default.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from .config import build_config, flatten, read_config_file, recipe_fields, validate, validate_recovery_grid
from .core.configs import RecoverConfig
from .errors import ConfigError
from .schema import SECTIONS, DistillConfig

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
# Recover settings a sweep may search; `first_multiplier` is shorthand for bn_weights "first:M".
# The levers of the SRe2L family (docs/levers.md) are searchable like the paper's settings.
SEARCHABLE = ("bn_coef", "bn_weights", "first_multiplier", "lr", "iterations", "jitter", "bn_normalize", "init",
              "grayscale", "class_bn_coef", "class_bn_form", "bn_smoothing", "init_pool", "init_crops",
              "init_patches")
SCHEDULERS = ("asha", "fifo")
# What a sweep file holds beyond a base configuration.
SWEEP_KEYS = ("name", "archs", "methods", "search", "scheduler", "resources", "num_samples", "max_concurrent",
              "eval_every", "backbones")


@dataclass(frozen=True)
class Param:
    kind: str  # one of DISTRIBUTIONS, or "value" for a constant
    args: tuple


@dataclass(frozen=True)
class Scheduler:
    name: str = "asha"
    grace_period: int = 1  # epochs of post-training before ASHA may stop a trial
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True)
class TuneConfig:
    name: str
    archs: tuple[str, ...]
    methods: tuple[str, ...]
    search: dict[str, Param]
    overrides: dict  # the base configuration the file (and the command line) sets, as flat schema keys
    base: DistillConfig  # that base resolved, on the validation share (`holdout`): every cell shares it
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    num_samples: int = 4
    max_concurrent: int = 0  # 0: as many as the resources allow
    eval_every: int = 1  # post-train epochs between validation reports (ASHA decides at these)
    backbones: dict[str, str] = field(default_factory=dict)  # "method/arch" -> checkpoint; others are squeezed

    @property
    def gpu(self) -> bool:
        return self.resources.gpu > 0

    def cell(self, arch: str, method: str, out: str) -> DistillConfig:
        """The configuration of one (arch, method) cell of the sweep in `out`: the base with that recovery
        model, built as `distill` builds a run (its models cached in `out`/backbones unless `models_dir`)."""
        given = {**self.overrides, "arch": arch, "method": method, "holdout": True, "out": out}
        if f"{method}/{arch}" in self.backbones:
            given["backbone"] = self.backbones[f"{method}/{arch}"]
        return build_config(given, gpu=self.gpu)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "base": self.base.to_dict()}


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(key, msg)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_param(key: str, spec: Any) -> Param:
    """`{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}`, `{choice: [...]}`,
    `{grid: [...]}`, or a plain value (constant)."""
    if not isinstance(spec, dict):
        return Param("value", (spec,))
    if len(spec) != 1:
        raise _err(key, f"give exactly one distribution of {', '.join(DISTRIBUTIONS)} (got {sorted(spec)})")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise _err(key, f"unknown distribution {kind!r} (choose from {', '.join(DISTRIBUTIONS)})")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise _err(key, f"{kind} takes a non-empty list (got {args!r})")
        return Param(kind, tuple(args))
    if not (isinstance(args, list) and len(args) == 2 and all(_number(a) for a in args)):
        raise _err(key, f"{kind} takes [low, high] numbers (got {args!r})")
    lo, hi = args
    if not lo < hi:
        raise _err(key, f"{kind} needs low < high (got {args!r})")
    if kind == "loguniform" and lo <= 0:
        raise _err(key, f"loguniform needs low > 0 (got {args!r})")
    if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise _err(key, f"randint takes integers (got {args!r})")
    return Param(kind, (lo, hi))


def _values(p: Param) -> list:
    """Values a parameter can take that can be checked up front (all of them for discrete kinds)."""
    if p.kind in ("choice", "grid", "value"):
        return list(p.args)
    lo, hi = p.args
    return [int(lo), int(hi) - 1] if p.kind == "randint" else [lo, hi]


def recover_for(base: RecoverConfig, sample: dict) -> RecoverConfig:
    """The trial's recover config: the base with the sampled values."""
    sample = dict(sample)
    if "first_multiplier" in sample:
        sample["bn_weights"] = f"first:{sample.pop('first_multiplier'):g}"
    return dataclasses.replace(base, **sample)


def _search(raw: dict, base: DistillConfig) -> dict[str, Param]:
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict) or not search_raw:
        raise _err("search", "must map recover settings to distributions, e.g. bn_coef: {loguniform: [0.01, 1]}")
    search = {}
    for k, spec in search_raw.items():
        if k not in SEARCHABLE:
            raise _err(f"search.{k}", f"not searchable (choose from {', '.join(SEARCHABLE)})")
        search[k] = parse_param(f"search.{k}", spec)
    if "first_multiplier" in search and "bn_weights" in search:
        raise _err("search.first_multiplier", "give either first_multiplier or bn_weights, not both")
    # Every value the space can produce must make a valid run with every value of the other keys: the levers
    # depend on each other (a pool needs real starting images, patches a pool large enough), so a value is
    # judged with its companions, never alone against the base.
    for combo in itertools.product(*([(k, v) for v in _values(p)] for k, p in search.items())):
        try:
            validate(dataclasses.replace(base, recover=recover_for(base.recover, dict(combo))))
        except (ConfigError, TypeError) as e:
            named = (getattr(e, "field", None) or "").removeprefix("recover.")
            key = named if named in search else combo[0][0]
            why = e.render() if isinstance(e, ConfigError) else str(e)
            what = (f"value {dict(combo)[key]!r}" if len(combo) == 1 else
                    "the combination " + ", ".join(f"{k}={v!r}" for k, v in combo))
            raise _err(f"search.{key}", f"{what} is invalid: {why}") from None
    return search


def _mapping(raw: dict, key: str, keys: tuple[str, ...]) -> dict:
    given = raw.get(key) or {}
    if not isinstance(given, dict):
        raise _err(key, f"must be a mapping (got {given!r})")
    for k in given:
        if k not in keys:
            raise _err(f"{key}.{k}", f"unknown key (valid: {', '.join(keys)})")
    return given


def _scheduler(raw: dict, posttrain) -> Scheduler:
    sched = Scheduler(**_mapping(raw, "scheduler", ("name", "grace_period", "reduction_factor")))
    if sched.name not in SCHEDULERS:
        raise _err("scheduler.name", f"must be one of {', '.join(SCHEDULERS)} (got {sched.name!r})")
    if not (isinstance(sched.grace_period, int) and 1 <= sched.grace_period <= posttrain.epochs):
        raise _err("scheduler.grace_period", f"must be an integer in [1, posttrain.epochs={posttrain.epochs}] "
                                             f"(got {sched.grace_period!r})")
    if not (_number(sched.reduction_factor) and sched.reduction_factor > 1):
        raise _err("scheduler.reduction_factor", f"must be > 1 (got {sched.reduction_factor!r})")
    return sched


def _resources(raw: dict) -> Resources:
    res = Resources(**_mapping(raw, "resources", ("cpu", "gpu")))
    if not (_number(res.cpu) and res.cpu > 0):
        raise _err("resources.cpu", f"must be > 0 (got {res.cpu!r})")
    if not (_number(res.gpu) and res.gpu >= 0):
        raise _err("resources.gpu", f"must be >= 0; fractions share a GPU (got {res.gpu!r})")
    return res


def _backbones(raw: dict, methods: list, archs: list) -> dict[str, str]:
    bb = raw.get("backbones") or {}
    if not isinstance(bb, dict):
        raise _err("backbones", f"must map method/arch to a checkpoint path (got {bb!r})")
    cells = {f"{m}/{a}" for m in methods for a in archs}
    for k, v in bb.items():
        if k not in cells:
            raise _err(f"backbones.{k}", f"is not a method/arch of this sweep (valid: {', '.join(sorted(cells))})")
        if not isinstance(v, str) or not v:
            raise _err(f"backbones.{k}", f"must be a checkpoint path (got {v!r})")
    return dict(bb)


def _check_scalars(cfg: TuneConfig) -> None:
    for k in ("num_samples", "eval_every"):
        v = getattr(cfg, k)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise _err(k, f"must be a positive integer (got {v!r})")
    if not (isinstance(cfg.max_concurrent, int) and cfg.max_concurrent >= 0):
        raise _err("max_concurrent", f"must be a non-negative integer (got {cfg.max_concurrent!r})")


def load_tune_config(raw: dict, given: dict | None = None) -> TuneConfig:
    """Validate a parsed sweep file; `given`: schema fields set on the command line (over the file's).
    Raises ConfigError naming the offending key."""
    if not isinstance(raw, dict):
        raise _err("config", "the YAML file must hold a mapping at its top level")
    known = {k.split(".")[0] for k in recipe_fields()} | set(SECTIONS)
    for k in raw:
        if k not in SWEEP_KEYS and k not in known:
            raise _err(k, f"unknown key (valid: {', '.join(sorted(known | set(SWEEP_KEYS)))})")
    res = _resources(raw)
    overrides = {**flatten({k: v for k, v in raw.items() if k not in SWEEP_KEYS}), **(given or {})}
    overrides.pop("holdout", None)  # a sweep chooses on the validation share, always
    base = build_config({**overrides, "holdout": True}, gpu=res.gpu > 0, run=False)
    archs = raw.get("archs", [base.arch])
    methods = raw.get("methods", ["scdd"])
    validate_recovery_grid(archs, methods)
    cfg = TuneConfig(
        name=str(raw.get("name", "sweep")), archs=tuple(archs), methods=tuple(methods),
        search=_search(raw, base), overrides=overrides, base=base,
        scheduler=_scheduler(raw, base.posttrain), resources=res, num_samples=raw.get("num_samples", 4),
        max_concurrent=raw.get("max_concurrent", 0), eval_every=raw.get("eval_every", 1),
        backbones=_backbones(raw, methods, archs),
    )
    _check_scalars(cfg)
    return cfg


def read_tune_config(path: str, given: dict | None = None, sweep: dict | None = None) -> TuneConfig:
    """The sweep in the YAML file `path` (`given`: schema fields set on the command line; `sweep`: sweep keys
    set on the command line over the file's, `archs`, `methods` and `max_concurrent`, validated by the
    caller); its errors are about `config` and name the file, then the key as the YAML writes it
    (`num_samples`, not a flag)."""
    raw = read_config_file(path)
    sweep = {k: v for k, v in (sweep or {}).items() if v is not None}
    if sweep and isinstance(raw, dict):  # cells one at a time, as their models exist: the file's others drop
        raw = {**raw, **{k: list(v) if isinstance(v, tuple) else v for k, v in sweep.items()}}
        bb = raw.get("backbones")
        if isinstance(bb, dict):
            archs, methods = raw.get("archs"), raw.get("methods")
            raw["backbones"] = {k: v for k, v in bb.items()
                                if (archs is None or str(k).split("/")[-1] in archs)
                                and (methods is None or str(k).split("/")[0] in methods)}
    try:
        return load_tune_config(raw, given)
    except ConfigError as e:
        raise _err("config", f"{path}: {e.render()}") from None


__all__ = ["TuneConfig", "Param", "Scheduler", "Resources", "load_tune_config", "read_tune_config", "recover_for",
           "parse_param"]
