"""Presets: what a dataset runs with unless told otherwise, one YAML file per dataset and scale.

`<dataset>-cpu.yaml` is the run on CPUs (no GPU asked for), `<dataset>-gpu.yaml`
the run on GPUs; `<dataset>.yaml` serves both scales when they do not differ.
A file holds schema keys only (top-level fields of scdd_ray.schema.DistillConfig
and its `squeeze`, `recover`, `posttrain` sections), plus `extends: NAME` to
start from another preset (its sections merged key by key). Values are data,
not code: scdd_ray.config checks every key and value when it builds a run.
"""
from __future__ import annotations

import os

import yaml

from ..errors import ConfigError

DIR = os.path.dirname(os.path.abspath(__file__))
SCALES = ("cpu", "gpu")


def file_name(dataset: str, gpu: bool) -> str | None:
    """The preset name (file name without .yaml) a run of `dataset` at this scale takes, or None."""
    for name in (f"{dataset}-{SCALES[gpu]}", dataset):
        if os.path.isfile(os.path.join(DIR, name + ".yaml")):
            return name
    return None


def names() -> tuple[str, ...]:
    return tuple(sorted(f[:-5] for f in os.listdir(DIR) if f.endswith(".yaml")))


def read(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """The preset file `name` with what it extends merged under it."""
    path = os.path.join(DIR, name + ".yaml")
    if name in _seen or not os.path.isfile(path):
        raise ConfigError("preset", f"{name!r} is not a preset (or extends itself); presets: {', '.join(names())}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    base = raw.pop("extends", None)
    return merge(read(base, _seen + (name,)), raw) if base else raw


def load(dataset: str, gpu: bool) -> dict:
    """The preset of `dataset` at this scale ({} when the dataset has none)."""
    name = file_name(dataset, gpu)
    return read(name) if name else {}


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings (the sections) merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
