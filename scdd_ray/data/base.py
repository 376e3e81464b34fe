"""What every dataset is made of: `ImageSet`s of uint8 CHW images with integer
labels, fixed stratified splits, batching, and per-class sampling.

Images are uint8 CHW tensors at `image_size`; normalisation happens on the
batch, on the device, next to the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

SPLITS = ("train", "val", "train-noval", "test")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grayscale: bool  # source images have one channel (repeated to three)


class ImageSet(Dataset):
    """uint8 CHW images with integer labels, in memory or read lazily from files."""

    info: DatasetInfo
    labels: torch.Tensor

    @property
    def in_memory(self) -> bool:
        return isinstance(self, TensorImageSet)

    def load(self, indices) -> torch.Tensor:
        return torch.stack([self[int(i)][0] for i in indices])

    def indices_of_class(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.labels.numpy() == c)


class TensorImageSet(ImageSet):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        assert images.dtype == torch.uint8 and images.ndim == 4
        self.images, self.labels, self.info = images, labels.long(), info

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def load(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]

    def subset(self, indices) -> "TensorImageSet":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImageSet(self.images[idx], self.labels[idx], self.info)


class FolderImageSet(ImageSet):
    """Files read with PIL, resized (shorter side) and centre-cropped to image_size."""

    def __init__(self, paths: list[str], labels: list[int], info: DatasetInfo, resize: int):
        self.paths, self.labels, self.info, self.resize = paths, torch.tensor(labels, dtype=torch.long), info, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            t = TF.pil_to_tensor(im.convert("RGB"))
        t = TF.resize(t, [self.resize], antialias=True)
        t = TF.center_crop(t, [self.info.image_size, self.info.image_size])
        return t, int(self.labels[i])

    def subset(self, indices) -> "FolderImageSet":
        return FolderImageSet([self.paths[int(i)] for i in indices], [int(self.labels[int(i)]) for i in indices],
                              self.info, self.resize)


def iterate(ds: ImageSet, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            drop_last: bool = False, num_workers: int | None = None, device=None):
    """Yield (uint8 images, labels) batches; in-memory sets skip DataLoader overhead.

    Batches that feed a GPU are in pinned memory, so that `.to(device,
    non_blocking=True)` is queued rather than waited for: in-memory sets are
    gathered straight into a pinned buffer; files are decoded by
    `num_workers` loader processes, by default up to 8 (decoding JPEGs in the
    training process starves the GPU), none on CPU, where they would take
    cores from the model.
    """
    n = len(ds)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if ds.in_memory:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            idx = order[s:s + batch_size]
            yield _gather(ds.images, idx, on_gpu), _gather(ds.labels, idx, on_gpu)
        return
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if on_gpu else 0
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                        num_workers=num_workers, pin_memory=on_gpu, persistent_workers=False)
    yield from loader


def _gather(t: torch.Tensor, idx: torch.Tensor, pinned: bool) -> torch.Tensor:
    """Rows `idx` of `t`, written straight into pinned memory when `pinned` (one copy, no pageable stage)."""
    if not pinned:
        return t[idx]
    out = torch.empty((len(idx),) + tuple(t.shape[1:]), dtype=t.dtype, pin_memory=True)
    return torch.index_select(t, 0, idx, out=out)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-class split: returns (rest, held_out) index arrays, sorted."""
    rng = np.random.RandomState(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(len(idx) * fraction))
        held.extend(rng.permutation(idx)[:k].tolist())
    held = np.array(sorted(held), dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), held)
    return rest, held


def resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def sample_per_class(ds: ImageSet, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` distinct random indices of each class (fewer if a class is smaller).

    Returns (indices, ipc_index) in class order; the draw depends only on `seed`.
    """
    rng = np.random.RandomState(seed)
    idx, pos = [], []
    for c in range(ds.info.num_classes):
        members = ds.indices_of_class(c)
        chosen = rng.permutation(members)[:per_class]
        idx.extend(chosen.tolist())
        pos.extend(range(len(chosen)))
    return np.array(idx, dtype=np.int64), np.array(pos, dtype=np.int64)
