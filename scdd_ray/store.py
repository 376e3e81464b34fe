"""Distilled-image storage: one Parquet file per finished shard, a manifest
that is the single source of truth for what is done, and an ImageFolder
export in the reference implementation's layout.

Every write is temp file + rename, and a shard is recorded in the manifest
only after its file is in place, so a crash at any point leaves either a
finished shard or one that a rerun computes again, never a half file and
never a duplicate row.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from .errors import StoreError

MANIFEST = "manifest.json"
FORMAT = "scdd-ray-shards/1"
SCHEMA = pa.schema([
    ("class_id", pa.int32()), ("ipc_index", pa.int32()), ("image", pa.binary()),
    ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
])


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.manifest_path} is unreadable ({type(e).__name__})") from None
        if m.get("format") != FORMAT:
            raise StoreError(f"{self.manifest_path} is not an scdd-ray shard manifest")
        return m

    def check(self, fingerprint: str) -> dict:
        """The manifest, after checking it belongs to this configuration (if it exists)."""
        m = self.manifest()
        if m["fingerprint"] is not None and m["fingerprint"] != fingerprint:
            raise StoreError(f"{self.root} holds shards of a different configuration "
                             f"(fingerprint {m['fingerprint']}, this run {fingerprint})")
        return m

    def open(self, fingerprint: str, meta: dict | None = None) -> None:
        """Create the store, or check an existing one belongs to the same configuration."""
        m = self.check(fingerprint)
        if m["fingerprint"] is None:
            m.update(fingerprint=fingerprint, meta=dict(meta or {}))
            atomic_write_json(self.manifest_path, m)

    def done(self) -> set[str]:
        return set(self.manifest()["shards"])

    def write_shard(self, shard_id: str, class_ids, ipc_indices, images: torch.Tensor, extra: dict | None = None) -> bool:
        """Write one finished shard; returns False (and writes nothing) if it is already recorded."""
        m = self.manifest()
        if shard_id in m["shards"]:
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
        atomic_write_bytes(os.path.join(self.root, fname), buf.getvalue().to_pybytes())
        m["shards"][shard_id] = {"file": fname, "rows": n, **(extra or {})}
        atomic_write_json(self.manifest_path, m)
        return True

    def files(self) -> list[str]:
        return [os.path.join(self.root, s["file"]) for _, s in sorted(self.manifest()["shards"].items())]

    def read(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """All recorded rows sorted by (class_id, ipc_index): uint8 images, class ids, ipc indices."""
        files = self.files()
        if not files:
            raise StoreError(f"{self.root} has no finished shards")
        return read_parquet_rows(files, self.root)


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
                with open(os.path.join(root, d, f), "rb") as fh:
                    rows.append((int(fm.group(1)), int(fm.group(2)), fh.read()))
    if not rows:
        raise StoreError(f"{root} has no images in the new<class>/class<c>_id<i>.png layout")
    return EncodedImages([pa.array([r[2] for r in rows], pa.large_binary())], np.array([r[0] for r in rows]),
                         np.array([r[1] for r in rows]))


class EncodedImages:
    """A distilled set held as its encoded image files (PNG, or JPEG from a folder); rows decode on demand.

    What a post-train worker keeps instead of the decoded set: ImageNet-1K at
    IPC 50 is 7.5 GB per worker as uint8 (and was twice that while stacking),
    its PNG bytes less. The bytes stay in the Arrow chunks they were read into
    (no copy, no 2 GB offset limit); `decode` gives exactly the pixels of eager reading.
    """

    def __init__(self, chunks: list, class_ids: np.ndarray, ipc_indices: np.ndarray, where: np.ndarray | None = None):
        self.chunks, self.class_ids, self.ipc_indices = chunks, class_ids, ipc_indices
        if where is None:  # (chunk, offset in it) of each row
            where = np.concatenate([np.stack([np.full(len(c), k), np.arange(len(c))], 1)
                                    for k, c in enumerate(chunks)] or [np.zeros((0, 2))]).astype(np.int64)
        self.where = where

    def __len__(self) -> int:
        return len(self.where)

    def sorted(self) -> "EncodedImages":
        """The rows in (class_id, ipc_index) order, the order every reader returns."""
        order = np.lexsort((self.ipc_indices, self.class_ids))
        return EncodedImages(self.chunks, self.class_ids[order], self.ipc_indices[order], self.where[order])

    def decode(self, indices) -> torch.Tensor:
        """uint8 (k, 3, H, W) images of rows `indices`."""
        return torch.stack([decode_png(self.chunks[self.where[int(i), 0]][self.where[int(i), 1]].as_py())
                            for i in indices])

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


def read_parquet_rows(files: list[str], root: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    return parquet_encoded(files, root).decode_all()


def parquet_encoded(files: list[str], root: str) -> EncodedImages:
    table = pa.concat_tables([pq.read_table(f, columns=["class_id", "ipc_index", "image"]) for f in files])
    cls = table.column("class_id").to_numpy().astype(np.int64)
    ipc = table.column("ipc_index").to_numpy().astype(np.int64)
    if len(set(zip(cls.tolist(), ipc.tolist()))) != len(cls):
        raise StoreError(f"{root} holds duplicate (class_id, ipc_index) rows")
    return EncodedImages(table.column("image").chunks, cls, ipc).sorted()


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
