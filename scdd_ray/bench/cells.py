"""Naming the cells of a benchmark table by the settings they do not share with the preset."""
from __future__ import annotations

import os

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
