"""May a command write into an output directory? New, empty, or its own earlier run of the same settings,
and no other process writing there."""
from __future__ import annotations

import errno
import json
import os

from ..errors import ConfigError
from ..locks import FileLock, holder, try_lock

LOCK_FILE = ".scdd-ray.lock"  # a name of ours: a user's own ".lock" is never taken over


def check_out_dir(out: str, run_file: str, fingerprint: str, what: str, field: str = "out",
                  describe_change=None) -> None:
    """Refuse `out` unless it is new, empty, or holds `run_file` with this `fingerprint`.

    `what` names the kind of run in the messages ("scdd-ray run", "posttrain
    run"); `describe_change(previous_run_json)` says what differs.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(field, f"{out} exists and is not a directory")
    if not os.path.isdir(out):
        _check_creatable(out, field)
        return
    if not set(os.listdir(out)) - {LOCK_FILE}:  # new, or a run that stopped before writing anything
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


def _check_creatable(out: str, field: str) -> None:
    """Refuse an `out` that cannot be created: under a file, or in a directory we may not write."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(field, f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(field, f"cannot create {out}: {parent} is not writable")


def lock_out_dir(out: str, field: str = "out") -> FileLock:
    """Make `out` this process's alone: an exclusive lock on OUT/.scdd-ray.lock (created with `out` if need be),
    held until released or until the process ends. Another process holding it is a ConfigError."""
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        lock = try_lock(os.path.join(out, LOCK_FILE))
    except OSError as e:
        if made and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # nothing written
        reason = "not a directory" if e.errno == errno.ENOTDIR else e.strerror
        raise ConfigError(field, f"cannot use {out}: {reason}") from None
    if lock is None:
        raise _busy(out, field)
    return lock


def check_not_busy(out: str, field: str = "out") -> None:
    """Refuse `out` at once if another process holds it, writing nothing (`lock_out_dir` makes sure later)."""
    path = os.path.join(out, LOCK_FILE)
    if not os.path.isfile(path):
        return
    try:
        lock = try_lock(path)
    except OSError:
        return  # `lock_out_dir` names the problem
    if lock is None:
        raise _busy(out, field)
    lock.release()


def _busy(out: str, field: str) -> ConfigError:
    who = holder(os.path.join(out, LOCK_FILE))
    return ConfigError(field, f"{out} is in use by another scdd-ray run{f' ({who})' if who else ''}; wait for it to "
                              "end or choose another directory")
