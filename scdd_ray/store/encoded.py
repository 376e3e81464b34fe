"""Distilled sets held as their encoded images (PNG in Parquet shards, or files of a reference-layout
folder), decoded row by row on demand, and the content hash that ties labels to images."""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..errors import StoreError
from .png import decode_png_hwc


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
    `sources` names the file of each row, for errors about an image. Like a
    tensor, the set has a `device` (`to`): where `gather` puts decoded rows.
    """

    def __init__(self, chunks: list, class_ids: np.ndarray, ipc_indices: np.ndarray, where: np.ndarray | None = None,
                 sources: np.ndarray | None = None, device="cpu"):
        self.chunks, self.class_ids, self.ipc_indices = chunks, class_ids, ipc_indices
        self.device = torch.device(device)
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
                             self.sources[order], self.device)

    def to(self, device) -> "EncodedImages":
        """The same encoded rows, gathered onto `device`."""
        return EncodedImages(self.chunks, self.class_ids, self.ipc_indices, self.where, self.sources, device)

    def gather(self, idx: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """uint8 images of rows `idx` on the set's device, positions `need` of `idx` decoded and the others
        left zero: a training step decodes only the images it crops, not the whole batch.

        Each image is decoded straight into the batch, which for a GPU is pinned
        memory, so its copy to the device is queued, not waited for."""
        pos, rows = need.tolist(), idx[need].tolist()
        first = self._decode_hwc(rows[0])
        out = torch.zeros((len(idx), first.shape[2]) + tuple(first.shape[:2]), dtype=torch.uint8,
                          pin_memory=self.device.type == "cuda")
        for k, (p, r) in enumerate(zip(pos, rows)):
            img = first if k == 0 else self._decode_hwc(r)
            chw = torch.from_numpy(img).permute(2, 0, 1)
            if img.shape != first.shape:  # a StoreError naming both files
                _stack([torch.from_numpy(first).permute(2, 0, 1), chw], [str(self.sources[x]) for x in (rows[0], r)])
            out[p].copy_(chw)
        return out.to(self.device, non_blocking=self.device.type != "cpu")

    def _decode_hwc(self, i: int) -> np.ndarray:
        """Row `i` decoded as an (H, W, 3) uint8 array; a damaged image is a StoreError naming its file."""
        return decode_image_hwc(self.chunks[self.where[i, 0]][self.where[i, 1]].as_py(), str(self.sources[i]))

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
    return torch.from_numpy(decode_image_hwc(data, where)).permute(2, 0, 1).contiguous()


def decode_image_hwc(data: bytes, where: str) -> np.ndarray:
    """The (H, W, 3) pixels of an encoded image; an undecodable one is a StoreError naming `where` (its file)."""
    try:
        return decode_png_hwc(data)
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


def images_digest(images: torch.Tensor) -> str:
    """Content hash of a set of uint8 images (ties stored soft labels to the images they label)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
