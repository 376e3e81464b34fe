"""Exclusive OS file locks: one writer per output directory, and atomic
read-modify-write of a manifest shared by several writers.

flock(2) locks belong to the open file, so the OS drops them when the holder
exits, however it exits (kill -9 included): a lock file left on disk is never
stale and needs no cleaning up. Python opens files non-inheritable, so a Ray
daemon started by the locking process does not keep the lock after it ends.
On NFS, Linux emulates flock with fcntl byte-range locks, which the server
arbitrates across machines.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket


class FileLock:
    """An exclusive lock held on `path` until `release` (or the end of a `with` block, or the process)."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def try_lock(path: str) -> FileLock | None:
    """Take the exclusive lock on `path` (created if missing) without waiting; None if another process holds it.

    The holder's pid and host are written into the file, for the message of
    whoever finds it locked. Raises OSError when `path` cannot be opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return FileLock(path, fd)


def holder(path: str) -> str:
    """'pid N on HOST' as the holder of `path` wrote it, or '' when unknown."""
    try:
        with open(path) as f:
            pid, host = f.read().split()[:2]
        return f"pid {int(pid)} on {host}"
    except (OSError, ValueError):
        return ""


@contextlib.contextmanager
def locked(path: str):
    """Hold the exclusive lock on `path` for the `with` block, waiting for it (for short critical sections)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
