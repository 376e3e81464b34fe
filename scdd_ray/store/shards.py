"""Distilled-image storage: one Parquet file per finished shard, and a manifest that is the single source of
truth for what is done.

Every write is temp file + rename, and a shard is recorded in the manifest
only after its file is in place, so a crash at any point leaves either a
finished shard or one that a rerun computes again, never a half file and
never a duplicate row. The manifest records each shard's size and sha256,
computed from the bytes written, so damage at rest is found before use; its
read-modify-write holds a lock file, so writers in several processes lose
no entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import StoreError
from ..locks import locked
from .atomic import atomic_write_json, remove_temp, rename_into_place, write_temp
from .encoded import read_parquet_rows
from .png import encode_png

MANIFEST = "manifest.json"

MANIFEST_LOCK = ".manifest.lock"

SHARD_FILE = re.compile(r"shard-[A-Za-z0-9_.-]+\.parquet")

FORMAT = "scdd-ray-shards/1"

SCHEMA = pa.schema([
    ("class_id", pa.int32()), ("ipc_index", pa.int32()), ("image", pa.binary()),
    ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
])


class ShardStore:
    """`root/manifest.json` + `root/shard-<id>.parquet`."""

    def __init__(self, root: str):
        self.root = root
        self.manifest_path = os.path.join(root, MANIFEST)

    def exists(self) -> bool:
        return os.path.isfile(self.manifest_path)

    def manifest(self) -> dict:
        if not self.exists():
            return {"format": FORMAT, "fingerprint": None, "shards": {}}
        try:
            with open(self.manifest_path) as f:
                m = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.manifest_path} is unreadable ({type(e).__name__})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{self.manifest_path} is not an scdd-ray shard manifest")
        shards = m.get("shards")
        if not isinstance(shards, dict) or not all(isinstance(e, dict) for e in shards.values()):
            raise StoreError(f"{self.manifest_path} is damaged: its \"shards\" is not an object of shard entries")
        for e in shards.values():  # a file name from disk must not lead outside the store
            if not isinstance(e.get("file"), str) or not SHARD_FILE.fullmatch(e["file"]):
                raise StoreError(f"{self.manifest_path} is damaged: it lists {e.get('file')!r}, not a shard file")
        return m

    def _update(self, change) -> None:
        """Read the manifest, `change(m)` it and write it back (unless it returns False), all under the
        manifest lock, so that writers in other processes lose no entry."""
        os.makedirs(self.root, exist_ok=True)
        with locked(os.path.join(self.root, MANIFEST_LOCK)):
            m = self.manifest()
            if change(m) is not False:
                atomic_write_json(self.manifest_path, m)

    def check(self, fingerprint: str) -> dict:
        """The manifest, after checking it belongs to this configuration (if it exists)."""
        m = self.manifest()
        if m.get("fingerprint") is not None and m["fingerprint"] != fingerprint:
            raise StoreError(f"{self.root} holds shards of a different configuration "
                             f"(fingerprint {m['fingerprint']}, this run {fingerprint})")
        return m

    def open(self, fingerprint: str, meta: dict | None = None) -> None:
        """Create the store, or check an existing one belongs to the same configuration."""
        if self.check(fingerprint).get("fingerprint") is None:
            def claim(m):
                if m.get("fingerprint") is not None:  # another process claimed it meanwhile
                    return False
                m.update(fingerprint=fingerprint, meta=dict(meta or {}))
            self._update(claim)
            self.check(fingerprint)

    def done(self) -> set[str]:
        return set(self.manifest()["shards"])

    def write_shard(self, shard_id: str, class_ids, ipc_indices, images: torch.Tensor, extra: dict | None = None) -> bool:
        """Write one finished shard; returns False (and writes nothing) if it is already recorded."""
        if shard_id in self.done():
            return False
        images = images.cpu()
        n, c, h, w = images.shape
        table = pa.table({
            "class_id": pa.array([int(v) for v in class_ids], pa.int32()),
            "ipc_index": pa.array([int(v) for v in ipc_indices], pa.int32()),
            "image": pa.array([encode_png(images[i]) for i in range(n)], pa.binary()),
            "height": pa.array([h] * n, pa.int32()), "width": pa.array([w] * n, pa.int32()),
            "channels": pa.array([c] * n, pa.int32()),
        }, schema=SCHEMA)
        fname = f"shard-{shard_id}.parquet"
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        entry = {"file": fname, "rows": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 **(extra or {})}
        path = os.path.join(self.root, fname)
        try:
            tmp = write_temp(path, data)
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from None

        recorded = []

        def record(m):
            if shard_id in m["shards"]:  # another writer recorded it first: keep its file
                os.remove(tmp)
                return False
            rename_into_place(tmp, path)  # inside the lock: the file and its entry change together
            m["shards"][shard_id] = entry
            recorded.append(shard_id)
        try:
            self._update(record)
        except BaseException as e:  # an OS error, or an interrupt (Ctrl-C, SIGTERM): no temp file left behind
            remove_temp(tmp)
            if not isinstance(e, OSError):
                raise
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
        return bool(recorded)

    def recover_seconds(self) -> float | None:
        """The recover seconds of every shard in the set summed (actor-seconds), whichever processes wrote them:
        a set finished across runs costs all of them, not the last one's leftovers. None when a shard has none."""
        shards = self.manifest()["shards"].values()
        seconds = [e.get("seconds") for e in shards]
        if not seconds or any(not isinstance(v, (int, float)) for v in seconds):
            return None
        return float(sum(seconds))

    def files(self) -> list[str]:
        return [os.path.join(self.root, s["file"]) for _, s in sorted(self.manifest()["shards"].items())]

    def verify(self, repair: bool = False) -> list[tuple[str, str]]:
        """(file, what is wrong) of every recorded shard that is missing or differs from what was written.

        With `repair`, those shards are dropped from the manifest, so a run
        computes them again; otherwise the first one is a StoreError.
        """
        bad = {sid: (os.path.join(self.root, e["file"]), why) for sid, e in sorted(self.manifest()["shards"].items())
               if (why := _damage(os.path.join(self.root, e["file"]), e))}
        if bad and not repair:
            path, why = next(iter(bad.values()))
            raise StoreError(f"{path} is damaged ({why}); rerun the distill command on its output directory to "
                             "compute it again")
        if bad:
            def drop(m):
                for sid in bad:
                    m["shards"].pop(sid, None)
            self._update(drop)
        return list(bad.values())

    def read(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """All recorded rows sorted by (class_id, ipc_index): uint8 images, class ids, ipc indices."""
        files = self.files()
        if not files:
            raise StoreError(f"{self.root} has no finished shards")
        self.verify()
        return read_parquet_rows(files, self.root)


def _damage(path: str, entry: dict) -> str:
    """What is wrong with shard file `path` against its manifest `entry` ('' if nothing)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if "sha256" not in entry:  # written before the manifest kept digests: check what can be checked
        try:
            rows = pq.read_metadata(pa.BufferReader(data)).num_rows
        except pa.ArrowException:
            return "not a readable Parquet file"
        return "" if rows == entry.get("rows") else f"{rows} rows, the manifest says {entry.get('rows')}"
    if len(data) != entry.get("bytes"):
        return f"{len(data)} bytes, the manifest says {entry.get('bytes')}"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return "sha256 differs from the manifest's"
    return ""
