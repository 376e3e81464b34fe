"""Atomic writes: a file is written whole or not at all (temp file beside it, fsync, rename)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets

from ..errors import StoreError


def write_temp(path: str, data: bytes) -> str:
    """`data` in a new temp file beside `path`, on disk (fsync); returns the temp file's name.

    Mode 0o666 lets the user's umask decide the permissions (mkstemp's 0o600
    hid outputs from colleagues on shared storage); the random name and
    O_EXCL keep concurrent writers apart.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove_temp(tmp)
        raise
    return tmp


def rename_into_place(tmp: str, path: str) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_temp(tmp)
        raise


def remove_temp(tmp: str) -> None:
    """Remove a temp file on the way out of a failed or interrupted write. A signal (Ctrl-C, SIGTERM) can
    land after the rename it interrupts: then there is nothing to remove, and the interrupt goes on."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)



TEMP_FILE = re.compile(r"\.tmp-[0-9a-f]{16}")  # the names `write_temp` gives



def sweep_temp_files(root: str) -> list[str]:
    """Remove the temp files a killed writer left under `root` (kill -9, power loss); returns their paths.

    Call it only while holding `root`'s lock: then no writer of ours is at work there.
    """
    swept = []
    for d, _, files in os.walk(root):
        for f in files:
            if TEMP_FILE.fullmatch(f):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(d, f))
                    swept.append(os.path.join(d, f))
    return sorted(swept)



def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `path` whole or not at all; an OS error (no space, not a directory, permission) is a
    StoreError naming `path`, and no temp file is left behind."""
    try:
        rename_into_place(write_temp(path, data), path)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
