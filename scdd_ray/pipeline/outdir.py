"""May a command write into an output directory? New, empty, or its own earlier run of the same settings."""
from __future__ import annotations

import json
import os

from ..errors import ConfigError


def check_out_dir(out: str, run_file: str, fingerprint: str, what: str, field: str = "out",
                  describe_change=None) -> None:
    """Refuse `out` unless it is new, empty, or holds `run_file` with this `fingerprint`.

    `what` names the kind of run in the messages ("scdd-ray run", "posttrain
    run"); `describe_change(previous_run_json)` says what differs.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(field, f"{out} exists and is not a directory")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    path = os.path.join(out, run_file)
    if not os.path.isfile(path):
        raise ConfigError(field, f"{out} is not empty and holds no {what} (no {run_file}); choose a new directory")
    try:
        with open(path) as f:
            prev = json.load(f)
        same = prev.get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        raise ConfigError(field, f"{path} is unreadable; choose a new directory") from None
    if not same:
        change = describe_change(prev) if describe_change else "other settings"
        raise ConfigError(field, f"{out} holds a different run ({change}); choose a new directory or the same settings")


def check_only_holds(out: str, names: set[str], what: str, field: str = "out") -> None:
    """Refuse `out` if it exists and holds anything but `names` (what an interrupted `what` leaves)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(field, f"{out} exists and is not a directory")
    if os.path.isdir(out) and set(os.listdir(out)) - names:
        raise ConfigError(field, f"{out} holds files that are not a {what}'s; choose a new directory")
