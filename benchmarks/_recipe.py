"""What the benchmark scripts share for their settings: a dataset's preset with KEY=VALUE overrides, built by
the package's own configuration builder, so no script holds a hyperparameter of its own."""
from __future__ import annotations

import argparse

import yaml

from scdd_ray.config import build_config
from scdd_ray.schema import DistillConfig


def add_recipe_args(ap: argparse.ArgumentParser, dataset: str) -> None:
    ap.add_argument("--dataset", default=dataset, help=f"whose preset gives the settings (default {dataset})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting over the preset, by its schema key (recover.lr=0.25); repeatable")


def recipe(a: argparse.Namespace, fixed: dict | None = None) -> DistillConfig:
    """The preset of `a.dataset` (its GPU one on a GPU device), then `fixed` (what the script decides), then
    `--set` (YAML values)."""
    given = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        given[key.strip()] = yaml.safe_load(value)
    gpu = getattr(a, "device", "cpu") == "cuda"
    return build_config({"dataset": a.dataset, **(fixed or {}), **given}, gpu=gpu, run=False)
