"""The errors scdd-ray raises about its input, and how they name what is wrong.

The library knows configuration fields (`recover.bn_weights`, `out`), never
command-line flags: an error carries the field it is about, and its message
may name other fields in backquotes. A front end shows its own names for
them through `render` (the CLI shows flags, a Tune YAML error its keys), so
the library reads the same whichever front end called it.
"""
from __future__ import annotations

import re
from typing import Callable

_FIELD_REF = re.compile(r"`([a-z_][a-z0-9_.]*)`")


class ScddError(ValueError):
    """A user-facing problem: a one-line message, optionally about one config field."""

    def __init__(self, message: str, field: str | None = None):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}" if field else message)

    def render(self, name_of: Callable[[str], str | None] = lambda f: None) -> str:
        """The message with every field shown by `name_of` (fields it does not know keep their name)."""
        def show(f: str) -> str:
            return name_of(f) or f

        msg = _FIELD_REF.sub(lambda m: show(m.group(1)), self.message)
        return f"{show(self.field)}: {msg}" if self.field else msg


class ConfigError(ScddError):
    """A setting that is invalid or cannot be honoured; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field or None)


class DataError(ScddError):
    """A dataset that cannot be read; the message says what was expected where."""


class CheckpointError(ScddError):
    """A checkpoint that cannot be read or does not fit."""


class NotOurCheckpoint(CheckpointError):
    """A readable torch file without our header: maybe a public checkpoint to import."""


class StoreError(ScddError):
    """Distilled data on disk that is missing, damaged or of another configuration, or an output that
    cannot be written (no space, not a directory, permission); names the file."""


class EngineError(ScddError):
    """A run that cannot finish (a shard failed too often, a post-train failed); names the cause."""


class Diverged(EngineError):
    """A stage whose loss became NaN or infinite; names the stage (and shard). Rerunning would diverge
    again: it is not retried."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and systemd send), handled as Ctrl-C: finished work is kept, the run
    stops, and the same command resumes it."""
