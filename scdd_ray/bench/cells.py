"""What a benchmark cell is: named by the settings it does not share with the preset, and its stored result
kept only while the settings it resolves to (presets included) are those it was made under."""
from __future__ import annotations

import json
import logging
import os

from ..core.configs import fingerprint_view

log = logging.getLogger("scdd_ray")

# Where a cell runs and which files it reads do not make it another cell.
PLACEMENT = ("data_dir", "num_gpus", "num_workers", "posttrain_workers", "address", "models_dir", "out")


def setting_text(value) -> str:
    """A setting as it appears in a directory name: tuples as LO,HI, a path as its file's stem (a committee's
    stems joined by +), no spaces."""
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" for v in value)
    if isinstance(value, str) and os.sep in value:  # a path, or several comma-separated (a committee)
        return "+".join(os.path.splitext(os.path.basename(p.strip()))[0] for p in value.split(","))
    return str(value)


def suffix(overrides: dict, skip: tuple[str, ...] = ()) -> str:
    """'-recover_init-real-width-0.5': the overrides a cell's name carries (those in `skip` and placement
    settings aside), sorted, so that tables with other settings never share a directory."""
    return "".join(f"-{k.replace('.', '_')}-{setting_text(v)}" for k, v in sorted(overrides.items())
                   if k not in PLACEMENT + skip)


def settings_key(cfg) -> dict:
    """What a cell's result depends on besides its name: the resolved settings, presets included.

    A cell's path is named by the table's overrides only, so a changed preset (a new post-train default,
    say) keeps the path; results written under other settings are computed again, never read back."""
    return {"run": cfg.fingerprint(), "posttrain": fingerprint_view(cfg.posttrain)}


def read_current(path: str, key: dict) -> dict | None:
    """The result at `path` if it was written under the settings `key`; None if absent or stale."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    if json.loads(json.dumps(key, default=str)) != result.get("cell_settings"):
        log.info("bench: %s was written under other settings (a preset changed since?): not reused", path)
        return None
    return result
