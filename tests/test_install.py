"""The install paths of README: `[dev]` pins the tested CPU stack; the package itself accepts any
torch >= 2.5, so a GPU machine's own CUDA build is kept (README, "Installing on a GPU machine")."""
import os
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _requirements(reqs):
    out = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)", r.strip())
        out[m.group(1).lower()] = m.group(3).replace(" ", "")
    return out


def test_base_dependencies_keep_an_installed_torch_and_dev_pins_the_tested_one():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    base = _requirements(project["dependencies"])
    assert base["torch"] == ">=2.5" and base["torchvision"] == ">=0.20"  # no upper bound, no exact pin
    assert not any(v.startswith("==") for v in base.values())
    dev = _requirements(project["optional-dependencies"]["dev"])
    assert dev["torch"] == "==2.14.1" and dev["torchvision"] == "==0.29.1" and "pytest" in dev
    test = _requirements(project["optional-dependencies"]["test"])
    assert set(test) == {"pytest"}  # what a GPU machine adds: no torch


def test_ci_runs_the_two_command_setup_of_readme():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for line in ("python3 -m venv .venv && . .venv/bin/activate", 'pip install -e ".[dev]"'):
        assert line in ci and line in readme
