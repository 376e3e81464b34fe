"""Distilled-image storage: one Parquet file per finished shard, a manifest
that is the single source of truth for what is done, and an ImageFolder
export in the reference implementation's layout.

Every write is temp file + rename, and a shard is recorded in the manifest
only after its file is in place, so a crash at any point leaves either a
finished shard or one that a rerun computes again, never a half file and
never a duplicate row. The manifest records each shard's size and sha256,
computed from the bytes written, so damage at rest is found before use; its
read-modify-write holds a lock file, so writers in several processes lose
no entry.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from .errors import StoreError
from .locks import locked

MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"
SHARD_FILE = re.compile(r"shard-[A-Za-z0-9_.-]+\.parquet")
FORMAT = "scdd-ray-shards/1"
SCHEMA = pa.schema([
    ("class_id", pa.int32()), ("ipc_index", pa.int32()), ("image", pa.binary()),
    ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
])


def _write_temp(path: str, data: bytes) -> str:
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
        _remove_temp(tmp)
        raise
    return tmp


def _replace(tmp: str, path: str) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_temp(tmp)
        raise


def _remove_temp(tmp: str) -> None:
    """Remove a temp file on the way out of a failed or interrupted write. A signal (Ctrl-C, SIGTERM) can
    land after the rename it interrupts: then there is nothing to remove, and the interrupt goes on."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)


TEMP_FILE = re.compile(r"\.tmp-[0-9a-f]{16}")  # the names `_write_temp` gives


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
        _replace(_write_temp(path, data), path)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 CHW tensor -> PNG bytes (lossless, so a reread equals what was written)."""
    arr = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


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
            tmp = _write_temp(path, data)
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from None

        recorded = []

        def record(m):
            if shard_id in m["shards"]:  # another writer recorded it first: keep its file
                os.remove(tmp)
                return False
            _replace(tmp, path)  # inside the lock: the file and its entry change together
            m["shards"][shard_id] = entry
            recorded.append(shard_id)
        try:
            self._update(record)
        except BaseException as e:  # an OS error, or an interrupt (Ctrl-C, SIGTERM): no temp file left behind
            _remove_temp(tmp)
            if not isinstance(e, OSError):
                raise
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
        return bool(recorded)

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


def export_imagefolder(root: str, images: torch.Tensor, class_ids, ipc_indices) -> None:
    """images/new{class:03d}/class{class:03d}_id{ipc:03d}.png, as the reference code lays out."""
    for img, c, i in zip(images, class_ids, ipc_indices):
        path = os.path.join(root, f"new{int(c):03d}", f"class{int(c):03d}_id{int(i):03d}.png")
        atomic_write_bytes(path, encode_png(img))


def read_imagefolder(root: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Read a reference-layout folder of synthetic images back (for `posttrain` on such folders)."""
    return imagefolder_encoded(root).decode_all()


def imagefolder_encoded(root: str) -> "EncodedImages":
    """The encoded files of a reference-layout folder, in (class, ipc) name order."""
    rows = []
    for d in sorted(os.listdir(root)):
        m = re.fullmatch(r"new(\d+)", d)
        if not m or not os.path.isdir(os.path.join(root, d)):
            continue
        for f in sorted(os.listdir(os.path.join(root, d))):
            fm = re.fullmatch(r"class(\d+)_id(\d+)\.(png|jpg|jpeg)", f, flags=re.I)
            if fm:
                path = os.path.join(root, d, f)
                with open(path, "rb") as fh:
                    rows.append((int(fm.group(1)), int(fm.group(2)), fh.read(), path))
    if not rows:
        raise StoreError(f"{root} has no images in the new<class>/class<c>_id<i>.png layout")
    return EncodedImages([pa.array([r[2] for r in rows], pa.large_binary())], np.array([r[0] for r in rows]),
                         np.array([r[1] for r in rows]), sources=np.array([r[3] for r in rows]))


class EncodedImages:
    """A distilled set held as its encoded image files (PNG, or JPEG from a folder); rows decode on demand.

    What a post-train worker keeps instead of the decoded set: ImageNet-1K at
    IPC 50 is 7.5 GB per worker as uint8 (and was twice that while stacking),
    its PNG bytes less. The bytes stay in the Arrow chunks they were read into
    (no copy, no 2 GB offset limit); `decode` gives exactly the pixels of eager reading.
    `sources` names the file of each row, for errors about an image.
    """

    def __init__(self, chunks: list, class_ids: np.ndarray, ipc_indices: np.ndarray, where: np.ndarray | None = None,
                 sources: np.ndarray | None = None):
        self.chunks, self.class_ids, self.ipc_indices = chunks, class_ids, ipc_indices
        if where is None:  # (chunk, offset in it) of each row
            where = np.concatenate([np.stack([np.full(len(c), k), np.arange(len(c))], 1)
                                    for k, c in enumerate(chunks)] or [np.zeros((0, 2))]).astype(np.int64)
        self.where = where
        self.sources = sources if sources is not None else np.array(["?"] * len(where))

    def __len__(self) -> int:
        return len(self.where)

    def sorted(self) -> "EncodedImages":
        """The rows in (class_id, ipc_index) order, the order every reader returns."""
        order = np.lexsort((self.ipc_indices, self.class_ids))
        return EncodedImages(self.chunks, self.class_ids[order], self.ipc_indices[order], self.where[order],
                             self.sources[order])

    def decode(self, indices) -> torch.Tensor:
        """uint8 (k, 3, H, W) images of rows `indices`; a damaged or odd-sized image is a StoreError naming its file."""
        rows = [int(i) for i in indices]
        where = [str(self.sources[i]) for i in rows]
        return _stack([decode_image(self.chunks[self.where[i, 0]][self.where[i, 1]].as_py(), w)
                       for i, w in zip(rows, where)], where)

    def decode_all(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Every image decoded, with class ids and ipc indices (what eager readers return)."""
        return self.decode(range(len(self))), self.class_ids, self.ipc_indices

    def digest(self) -> str:
        """`images_digest` of the decoded set, decoding one image at a time."""
        h = None
        for i in range(len(self)):
            img = self.decode([i])
            if h is None:
                h = hashlib.sha256(str((len(self),) + tuple(img.shape[1:])).encode())
            h.update(img.numpy().tobytes())
        return h.hexdigest()[:16]


def decode_image(data: bytes, where: str) -> torch.Tensor:
    """`decode_png`, with an undecodable image a StoreError naming `where` (its file)."""
    try:
        return decode_png(data)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's errors for damaged images
        raise StoreError(f"{where} holds an image that cannot be decoded ({type(e).__name__})") from None


def _stack(images: list[torch.Tensor], where: list[str]) -> torch.Tensor:
    """One tensor of same-size images; images of another size are a StoreError naming the first such file."""
    for im, w in zip(images, where):
        if im.shape != images[0].shape:
            (_, h, wd), (_, h0, w0) = im.shape, images[0].shape
            raise StoreError(f"{w} is {h}x{wd} but {where[0]} is {h0}x{w0}; the images of a distilled set must "
                             "all have one size")
    return torch.stack(images)


def _read_table(path: str) -> pa.Table:
    try:
        return pq.read_table(path, columns=["class_id", "ipc_index", "image"])
    except (OSError, pa.ArrowException) as e:
        raise StoreError(f"{path} is not a readable shard of distilled images ({type(e).__name__})") from None


def read_parquet_rows(files: list[str], root: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    return parquet_encoded(files, root).decode_all()


def parquet_encoded(files: list[str], root: str) -> EncodedImages:
    tables = [_read_table(f) for f in files]
    table = pa.concat_tables(tables)
    cls = table.column("class_id").to_numpy().astype(np.int64)
    ipc = table.column("ipc_index").to_numpy().astype(np.int64)
    if len(set(zip(cls.tolist(), ipc.tolist()))) != len(cls):
        raise StoreError(f"{root} holds duplicate (class_id, ipc_index) rows")
    sources = np.array([f for f, t in zip(files, tables) for _ in range(t.num_rows)])  # the file of each row
    return EncodedImages(table.column("image").chunks, cls, ipc, sources=sources).sorted()


def find_distilled(root: str) -> tuple[str, list[str]]:
    """What `root` holds: ('shards', files) for a manifest, ('parquet', files) for bare *.parquet
    files, ('imagefolder', []) for the reference layout; StoreError when it holds no images."""
    if not os.path.isdir(root):
        raise StoreError(f"{root} is not a directory")
    store = ShardStore(root)
    if store.exists():
        files = store.files()
        if not files:
            raise StoreError(f"{root} has no finished shards (its manifest lists none)")
        store.verify()
        return "shards", files
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".parquet"))
    if files:
        return "parquet", files
    if any(re.fullmatch(r"new\d+", d) for d in os.listdir(root)):
        return "imagefolder", []
    raise StoreError(f"{root} holds no distilled images: expected manifest.json + shard-*.parquet (a distill "
                     "output), *.parquet files, or new<class>/class<c>_id<i>.png folders")


def read_distilled(root: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """uint8 images, class ids and ipc indices of a distilled set, sorted by (class_id, ipc_index)."""
    return read_encoded(root).decode_all()


def read_encoded(root: str) -> EncodedImages:
    """A distilled set as `read_distilled` orders it, still encoded (decoded per batch by its user)."""
    kind, files = find_distilled(root)
    if kind == "imagefolder":
        return imagefolder_encoded(root).sorted()
    return parquet_encoded(files, root)


def plan_problem(class_ids, ipc_indices, per_class: list[int]) -> tuple[str, str]:
    """(rows outside the plan, rows the plan has that are missing), each in words ('' when none).

    `per_class[c]` images of class c, at IPC indices 0..per_class[c]-1, make a run's plan: a row outside
    it is of another run (or another IPC), a missing one was not computed yet (an interrupted run).
    """
    have = set(zip((int(c) for c in class_ids), (int(i) for i in ipc_indices)))
    outside = sorted((c, i) for c, i in have if not (0 <= c < len(per_class) and 0 <= i < per_class[c]))
    missing = [(c, i) for c, n in enumerate(per_class) for i in range(n) if (c, i) not in have]
    said_outside = (f"{len(outside)} images outside its run's plan (first: class {outside[0][0]} IPC index "
                    f"{outside[0][1]}; the plan has {len(per_class)} classes, up to {max(per_class, default=0)} "
                    "a class)") if outside else ""
    said_missing = (f"{len(missing)} of the {sum(per_class)} images of its run's plan missing (first: class "
                    f"{missing[0][0]} IPC index {missing[0][1]})") if missing else ""
    return said_outside, said_missing


def images_digest(images: torch.Tensor) -> str:
    """Content hash of a set of uint8 images (ties stored soft labels to the images they label)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- stored soft labels ----------------------------------------------------------
# One Parquet file per (epoch, writer rank): one row per crop with what is
# needed to rebuild the crop (image, random-resized-crop box, flip, mixing
# partner and box/weight) and the teacher's top-k probabilities on it.

SOFT_META = "soft_labels.json"
SOFT_FORMAT = "scdd-ray-soft-labels/1"


def soft_label_schema(k: int) -> pa.Schema:
    return pa.schema([
        ("epoch", pa.int32()), ("step", pa.int32()), ("slot", pa.int32()), ("image", pa.int32()),
        ("box_w", pa.float32()), ("box_h", pa.float32()), ("box_cx", pa.float32()), ("box_cy", pa.float32()),
        ("flip", pa.bool_()), ("mix", pa.int8()), ("partner", pa.int32()),
        ("cut_y0", pa.int16()), ("cut_y1", pa.int16()), ("cut_x0", pa.int16()), ("cut_x1", pa.int16()),
        ("lam", pa.float32()),
        ("topk_index", pa.list_(pa.int16(), k)), ("topk_prob", pa.list_(pa.float16(), k)),
    ])


def soft_label_file(root: str, epoch: int, rank: int) -> str:
    return os.path.join(root, f"epoch-{epoch:05d}-rank-{rank:03d}.parquet")


def write_soft_labels(root: str, epoch: int, rank: int, columns: dict, k: int) -> None:
    """Write one epoch's rows of one writer atomically (columns: name -> numpy array)."""
    cols = {}
    for f in soft_label_schema(k):
        v = columns[f.name]
        if pa.types.is_fixed_size_list(f.type):
            flat = pa.array(np.ascontiguousarray(v).reshape(-1), f.type.value_type)
            cols[f.name] = pa.FixedSizeListArray.from_arrays(flat, k)
        else:
            cols[f.name] = pa.array(v, f.type)
    table = pa.table(cols, schema=soft_label_schema(k))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(soft_label_file(root, epoch, rank), buf.getvalue().to_pybytes())


def read_soft_labels(root: str, epoch: int) -> dict:
    """All rows of one epoch, sorted by (step, slot), as numpy arrays; StoreError if any is missing."""
    prefix = f"epoch-{epoch:05d}-rank-"
    files = sorted(f for f in os.listdir(root) if f.startswith(prefix) and f.endswith(".parquet"))
    if not files:
        raise StoreError(f"{root} has no stored soft labels for epoch {epoch + 1}")
    table = pa.concat_tables([pq.read_table(os.path.join(root, f)) for f in files])
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            k = col.type.list_size
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    order = np.lexsort((out["slot"], out["step"]))
    out = {k: v[order] for k, v in out.items()}
    key = out["step"].astype(np.int64) * (1 << 32) + out["slot"]
    if len(np.unique(key)) != len(key):
        raise StoreError(f"{root} holds duplicate crops for epoch {epoch + 1}")
    return out
