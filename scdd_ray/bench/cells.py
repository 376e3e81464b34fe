"""What a benchmark cell is: named by the settings it does not share with the preset, and its stored result
kept only while the settings it resolves to (presets included) are those it was made under."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

from ..backbones import plan_models
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


def settings_key(cfg, models=None) -> dict:
    """What a cell's result depends on besides its name: the resolved settings, presets included, and the
    model files it runs with (`models`: the configuration that names them, when another than `cfg`'s).

    A cell's path is named by the table's overrides only, so a changed preset (a new post-train default,
    say) keeps the path; results written under other settings are computed again, never read back. So are
    results made with other weights under the same file name: a teacher squeezed again by newer code, say."""
    return {"run": cfg.fingerprint(), "posttrain": fingerprint_view(cfg.posttrain),
            "models": model_digests(models or cfg)}


def model_digests(cfg) -> dict:
    """Content digests of the recovery backbone and teacher files `cfg` runs with; None for one not there
    yet (the run squeezes it: its caller takes the key again once the run is done)."""
    plan = plan_models(cfg)
    return {"backbone": _file_digest(plan.backbone.path) if plan.backbone else None,
            "teachers": [_file_digest(t.path) for t in plan.teachers]}


def _file_digest(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:  # not squeezed yet, or not a file (a public model's name)
        return None
    return _digest_of(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    """16 hex digits of sha256 over the file's bytes (size and mtime key the cache: a rewrite is read anew)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


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
