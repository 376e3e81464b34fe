"""The methods a run can name: the paper's two (scdd recovers from a self-supervised backbone, sre2l from a
supervised one), the random real subset, and named recipes.

A recipe is one of the paper's methods with other recover settings: a combination of the SRe2L family's
levers (docs/levers.md) chosen by a measured screen. It keeps its own name so that `scdd` stays the method
the paper defines and a table never passes one off as the other. A recipe's settings sit between the
dataset's preset and what the user gives (a config file, flags), so any of them can still be changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PAPER = ("scdd", "sre2l")  # the methods that recover images from a backbone, as the papers define them
RANDOM = "random"


@dataclass(frozen=True)
class Recipe:
    base: str  # the paper's method it starts from: which backbone it recovers from
    recover: dict = field(default_factory=dict)  # recover settings over the preset's


RECIPES: dict[str, Recipe] = {
    # Real patches chosen by the SSL recovery model's confidence, four to an image (RDED), then a short
    # recovery (100 iterations) against its BatchNorm statistics. Chosen on CIFAR-10's validation share
    # among the levers of docs/levers.md (benchmarks/results/cifar10_lever_screen.md).
    "scdd-patches": Recipe("scdd", {"init": "real", "init_pool": 100, "init_crops": 5, "init_patches": 2,
                                    "iterations": 100}),
}

METHODS = (*PAPER, RANDOM, *RECIPES)
TABLE = (RANDOM, "sre2l", "scdd")  # what `bench table` ranks by default: the random subset first, then the paper's
RECOVERY_METHODS = (*PAPER, *RECIPES)


def base_method(name: str | None) -> str | None:
    """The paper's method (or random) `name` is or starts from."""
    return RECIPES[name].base if name in RECIPES else name


def recipe_settings(name: str | None) -> dict:
    """The flat settings (`recover.lr`, ...) the method `name` sets over the preset ({} for the paper's)."""
    recipe = RECIPES.get(name)
    return {f"recover.{k}": v for k, v in recipe.recover.items()} if recipe else {}
