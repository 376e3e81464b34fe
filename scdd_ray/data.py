"""Dataset registry. Nothing is ever downloaded: data comes from scikit-learn's
bundled digits, or from a local directory the user names.

Splits: `train` (the official training set), `test` (the official test set,
used only to report final numbers), `val` (a fixed stratified subset of train,
for tuning) and `train-noval` (train minus val, what a tuned teacher sees).
Images are uint8 CHW tensors at `image_size`; normalisation happens on the
batch, on the device, next to the model.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "val", "train-noval", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset that cannot be read; the message says what was expected where."""


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
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        with Image.open(self.paths[i]) as im:
            t = TF.pil_to_tensor(im.convert("RGB"))
        t = TF.resize(t, [self.resize], antialias=True)
        t = TF.center_crop(t, [self.info.image_size, self.info.image_size])
        return t, int(self.labels[i])

    def subset(self, indices) -> "FolderImageSet":
        return FolderImageSet([self.paths[int(i)] for i in indices], [int(self.labels[int(i)]) for i in indices],
                              self.info, self.resize)


def iterate(ds: ImageSet, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            drop_last: bool = False, num_workers: int = 0):
    """Yield (uint8 images, labels) batches; in-memory sets skip DataLoader overhead."""
    n = len(ds)
    if ds.in_memory:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            idx = order[s:s + batch_size]
            yield ds.images[idx], ds.labels[idx]
        return
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                        num_workers=num_workers, persistent_workers=False)
    yield from loader


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


def _resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def _split_tensor_set(train: TensorImageSet, test: TensorImageSet, split: str, val_fraction: float) -> TensorImageSet:
    if split == "test":
        return test
    if split == "train":
        return train
    rest, held = stratified_split(train.labels.numpy(), val_fraction, seed=0)
    return train.subset(held if split == "val" else rest)


# --- digits ------------------------------------------------------------------

@lru_cache(maxsize=8)
def _digits(image_size: int) -> tuple[TensorImageSet, TensorImageSet]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0 * 255.0).round().astype(np.uint8)).unsqueeze(1)  # N,1,8,8
    x = _resize_u8(x, image_size).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    train_idx, test_idx = stratified_split(d.target, 0.2, seed=0)
    # Grayscale statistics of the training split, the same for all three channels.
    t = x[torch.as_tensor(train_idx)][:, 0].float() / 255.0
    mean, std = float(t.mean()), float(t.std())
    info = DatasetInfo("digits", 10, tuple(str(i) for i in range(10)), image_size, (mean,) * 3, (std,) * 3, True)
    tr = TensorImageSet(x[torch.as_tensor(train_idx)], y[torch.as_tensor(train_idx)], info)
    te = TensorImageSet(x[torch.as_tensor(test_idx)], y[torch.as_tensor(test_idx)], info)
    return tr, te


# --- CIFAR (python pickle layout) --------------------------------------------

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names="label_names", labels="labels", n=10,
                    mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     names="fine_label_names", labels="fine_labels", n=100, mean=CIFAR100_MEAN, std=CIFAR100_STD),
}


def _cifar_root(name: str, data_dir: str | None) -> str:
    spec = _CIFAR[name]
    if not data_dir:
        raise DataError(f"--data-dir is required for {name}: a directory holding {spec['folder']}/ "
                        "(the python version of the dataset; nothing is downloaded)")
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} does not exist (expected a directory holding {spec['folder']}/)")
    for root in (os.path.join(data_dir, spec["folder"]), data_dir):
        if all(os.path.isfile(os.path.join(root, f)) for f in spec["train"] + spec["test"] + [spec["meta"]]):
            return root
    want = ", ".join(spec["train"] + spec["test"] + [spec["meta"]])
    raise DataError(f"--data-dir {data_dir} has no {name} files: expected {spec['folder']}/ with {want} "
                    "(CIFAR python pickle layout)")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(e).__name__})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


@lru_cache(maxsize=4)
def _cifar(name: str, data_dir: str, image_size: int) -> tuple[TensorImageSet, TensorImageSet]:
    spec = _CIFAR[name]
    root = _cifar_root(name, data_dir)
    meta = _unpickle(os.path.join(root, spec["meta"]))
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names"]])
    info = DatasetInfo(name, spec["n"], names, image_size, spec["mean"], spec["std"], False)

    def read(files):
        xs, ys = [], []
        for f in files:
            d = _unpickle(os.path.join(root, f))
            if "data" not in d or spec["labels"] not in d:
                raise DataError(f"{os.path.join(root, f)} lacks 'data' or '{spec['labels']}' (not a {name} file)")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[spec["labels"]], dtype=np.int64))
        x = _resize_u8(torch.from_numpy(np.concatenate(xs)), image_size)
        return TensorImageSet(x, torch.from_numpy(np.concatenate(ys)), info)

    return read(spec["train"]), read(spec["test"])


# --- ImageFolder (train/<class>/*, val/<class>/*) ----------------------------

def _scan(folder: str) -> tuple[list[str], list[list[str]]]:
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files = []
    for c in classes:
        cdir = os.path.join(folder, c)
        files.append(sorted(os.path.join(cdir, f) for f in os.listdir(cdir) if f.lower().endswith(IMAGE_EXTS)))
    return classes, files


@lru_cache(maxsize=4)
def _imagefolder(data_dir: str, image_size: int) -> tuple[DatasetInfo, FolderImageSet, FolderImageSet]:
    if not data_dir:
        raise DataError("--data-dir is required for imagefolder: a directory with train/<class>/*.jpg and "
                        "val/<class>/*.jpg (Tiny-ImageNet / ImageNet layout)")
    tr_dir, va_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    for d in (tr_dir, va_dir):
        if not os.path.isdir(d):
            raise DataError(f"--data-dir {data_dir}: missing {d} (expected train/<class>/* and val/<class>/*)")
    classes, files = _scan(tr_dir)
    if not classes or not any(files):
        raise DataError(f"--data-dir {data_dir}: {tr_dir} has no class folders with images")
    empty = [c for c, f in zip(classes, files) if not f]
    if empty:
        raise DataError(f"--data-dir {data_dir}: class folder train/{empty[0]} has no images")
    vclasses, vfiles = _scan(va_dir)
    unknown = sorted(set(vclasses) - set(classes))
    if unknown:
        raise DataError(f"--data-dir {data_dir}: val/{unknown[0]} is not a class of train/")
    cid = {c: i for i, c in enumerate(classes)}
    info = DatasetInfo("imagefolder", len(classes), tuple(classes), image_size, IMAGENET_MEAN, IMAGENET_STD, False)
    # Standard evaluation resize: shorter side to size/0.875, then centre crop.
    resize = int(round(image_size / 0.875))
    train = FolderImageSet([p for f in files for p in f], [i for i, f in enumerate(files) for _ in f], info, resize)
    test = FolderImageSet([p for f in vfiles for p in f], [cid[c] for c, f in zip(vclasses, vfiles) for _ in f],
                          info, resize)
    return info, train, test


# --- synthetic (tests only) --------------------------------------------------

@lru_cache(maxsize=4)
def _synthetic(image_size: int, num_classes: int = 4, per_class: int = 24) -> tuple[TensorImageSet, TensorImageSet]:
    """Class-dependent colour blobs plus noise: learnable, tiny, deterministic."""
    g = torch.Generator().manual_seed(1234)
    n = num_classes * per_class
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    base = torch.rand(num_classes, 3, 1, 1, generator=g)
    x = base[labels] * 0.7 + torch.rand(n, 3, image_size, image_size, generator=g) * 0.3
    images = (x * 255).round().to(torch.uint8)
    info = DatasetInfo("synthetic", num_classes, tuple(f"class{i}" for i in range(num_classes)), image_size,
                       (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)
    full = TensorImageSet(images, labels, info)
    tr, te = stratified_split(labels.numpy(), 0.25, seed=0)
    return full.subset(tr), full.subset(te)


def load_split(name: str, split: str, data_dir: str | None = None, image_size: int = 32) -> ImageSet:
    """One split of a registered dataset; raises DataError with what was expected where."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if name == "digits":
        return _split_tensor_set(*_digits(image_size), split, 0.1)
    if name in _CIFAR:
        root = os.path.abspath(data_dir) if data_dir else ""
        return _split_tensor_set(*_cifar(name, root, image_size), split, 0.1)
    if name == "imagefolder":
        info, train, test = _imagefolder(os.path.abspath(data_dir) if data_dir else "", image_size)
        if split == "test":
            return test
        if split == "train":
            return train
        # At most 10% and at most 50 images per class held out for validation.
        labels = train.labels.numpy()
        frac = min(0.1, 50.0 / max(1, np.bincount(labels).min()))
        rest, held = stratified_split(labels, frac, seed=0)
        return train.subset(held if split == "val" else rest)
    if name == "synthetic":
        return _split_tensor_set(*_synthetic(image_size), split, 0.25)
    raise DataError(f"unknown dataset {name!r}")


def dataset_info(name: str, data_dir: str | None = None, image_size: int = 32) -> DatasetInfo:
    """Check the dataset is readable and describe it (loads in-memory sets once; cached)."""
    return load_split(name, "test", data_dir, image_size).info


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
