"""Image-classification datasets in the Hugging Face Parquet layout: `--dataset parquet --data-dir DIR`.

DIR (or DIR/data, as hub repositories lay it out) holds `train-*.parquet`,
`test-*.parquet` and optionally `validation-*.parquet`. Each row has an image
column of encoded bytes (a struct `{bytes, path}`, as `datasets` writes it,
or plain binary) and an integer label column. Column names differ between
datasets (`img`/`label` for CIFAR-10, `image`/`label` for most others,
`img`/`fine_label` for CIFAR-100): the usual ones are detected, others are
named with `image_column` / `label_column`. Class names come from the schema
metadata (`classes`, or the `huggingface` features' ClassLabel names) or from
DIR/classes.txt; otherwise they are the label numbers.

A `validation` split, when present, is the `val` split (and `train-noval` is
all of train); otherwise `val` is carved from train as for every dataset.
"""
from __future__ import annotations

import glob
import io
import json
import os
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .base import DatasetInfo, TensorImageSet, resize_u8
from .registry import DatasetSpec, register

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
PARQUET_SPLITS = {"train": "train", "test": "test", "val": "validation"}


def split_files(data_dir: str, split: str) -> list[str]:
    """The Parquet files of one split (`train`, `test`, `validation`), in DIR or DIR/data."""
    for root in (data_dir, os.path.join(data_dir, "data")):
        files = sorted(glob.glob(os.path.join(glob.escape(root), f"{split}-*.parquet")))
        if files:
            return files
    return []


def has_parquet_layout(data_dir: str) -> bool:
    return bool(data_dir) and bool(split_files(data_dir, "train"))


def pick_column(schema: pa.Schema, given: str | None, usual: tuple[str, ...], role: str, path: str) -> str:
    """The column that holds the images (or labels): the one named, else the single usual one present."""
    names = schema.names
    if given:
        if given not in names:
            raise DataError(f"{path} has no column {given!r} (its columns: {', '.join(names)})")
        return given
    found = [c for c in usual if c in names]
    if len(found) != 1:
        field = "image_column" if role == "image" else "label_column"
        what = "several" if found else "no"
        raise DataError(f"{path} has {what} {role} column{'s' if found else ''} among {', '.join(names)} "
                        f"(looked for {', '.join(usual)}); name it with `{field}`")
    return found[0]


def class_names(schema: pa.Schema, label_column: str, data_dir: str, path: str = "") -> tuple[str, ...] | None:
    """Class names from the schema metadata or DIR/classes.txt, in label order; None when nowhere.
    Metadata that does not parse is a DataError naming `path` (the file whose schema it is)."""
    try:
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    except UnicodeDecodeError:
        raise DataError(f"{path}: its schema metadata is not UTF-8 text") from None
    if "classes" in meta:
        text = meta["classes"].strip()
        names = _json(text, path, "classes") if text.startswith("[") else [c.strip() for c in text.split(",")]
        if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
            raise DataError(f"{path}: its 'classes' metadata is not a list of class names")
        return tuple(str(n) for n in names)
    if "huggingface" in meta:
        hf = _json(meta["huggingface"], path, "huggingface")
        try:
            names = hf.get("info", {}).get("features", {}).get(label_column, {}).get("names")
        except AttributeError:
            raise DataError(f"{path}: its 'huggingface' metadata is not the features record `datasets` "
                            "writes") from None
        if names:
            if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
                raise DataError(f"{path}: the class names in its 'huggingface' metadata are not a list of names")
            return tuple(str(n) for n in names)
    txt = os.path.join(data_dir, "classes.txt")
    if os.path.isfile(txt):
        try:
            with open(txt, encoding="utf-8") as f:
                return tuple(line.strip() for line in f if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{txt} is unreadable ({type(e).__name__})") from None
    return None


def _json(text: str, path: str, key: str):
    try:
        return json.loads(text)
    except ValueError:
        raise DataError(f"{path}: its '{key}' schema metadata is not valid JSON") from None


def _decode(blob, path: str, row: int, image_size: int | None, first: list | None = None) -> torch.Tensor:
    """One image at `image_size` (None: as stored). `first` holds (side, where) of the dataset's first image:
    an image of another side is a DataError, never resized silently."""
    data = blob.get("bytes") if isinstance(blob, dict) else blob
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, TypeError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path} row {row}: the image does not decode ({type(e).__name__})") from None
    if arr.shape[0] != arr.shape[1]:
        raise DataError(f"{path} row {row}: the image is {arr.shape[1]}x{arr.shape[0]}, not square")
    if first is not None:
        if not first:
            first.append((arr.shape[0], f"{path} row {row}"))
        elif arr.shape[0] != first[0][0]:
            side, where = first[0]
            raise DataError(f"{path} row {row}: the image is {arr.shape[0]}x{arr.shape[0]} but {where} is "
                            f"{side}x{side}; a dataset's images must share one size (resize them beforehand; "
                            "`image_size` then rescales them all alike)")
    if image_size is None:
        return torch.from_numpy(arr).permute(2, 0, 1)
    return resize_u8(torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0), image_size)[0]


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__})") from None


def _damaged(path: str, e: Exception) -> DataError:
    first = (str(e).strip().splitlines() or [""])[0][:120]
    return DataError(f"{path} is damaged: its data cannot be read ({type(e).__name__}{': ' + first if first else ''})")


def read_split(files: list[str], image_size: int, image_column: str | None, label_column: str | None,
               first: list | None = None):
    """(uint8 images, int64 labels, schema, label column) of the rows of `files`; `first` as `_decode` takes it
    (shared by the splits of one dataset). Any failure is a DataError naming the file (and row)."""
    images, labels, schema, label_col = [], [], None, None
    first = [] if first is None else first
    for path in files:
        pf = _open(path)
        schema = schema or pf.schema_arrow
        img_col = pick_column(pf.schema_arrow, image_column, IMAGE_COLUMNS, "image", path)
        label_col = pick_column(pf.schema_arrow, label_column, LABEL_COLUMNS, "label", path)
        if not pa.types.is_integer(pf.schema_arrow.field(label_col).type):
            raise DataError(f"{path}: label column {label_col!r} holds {pf.schema_arrow.field(label_col).type}, "
                            "not integers")
        try:  # a column chunk can be damaged under an intact footer
            table = pf.read(columns=[img_col, label_col])
            blobs, file_labels = table.column(img_col).to_pylist(), table.column(label_col).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise _damaged(path, e) from None
        for i, blob in enumerate(blobs):
            images.append(_decode(blob, path, i, image_size, first))
        if any(v is None for v in file_labels):
            raise DataError(f"{path}: label column {label_col!r} has empty values")
        labels.extend(file_labels)
    if not labels:
        more = f" (and {len(files) - 1} more files)" if len(files) > 1 else ""
        raise DataError(f"{files[0]}{more}: the split holds no rows")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), schema, label_col


def _check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise DataError(f"{where}: label {int(bad[0])} is out of range for {num_classes} classes")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 sums)."""
    x = images.double().div(255.0)
    return (tuple(float(v) for v in x.mean(dim=(0, 2, 3))), tuple(float(v) for v in x.std(dim=(0, 2, 3))))


@lru_cache(maxsize=4)
def load_parquet_sets(data_dir: str, image_size: int, image_column: str | None = None,
                      label_column: str | None = None, name: str = "parquet", mean=None, std=None):
    """(train, test or None, validation or None) of a Hugging Face Parquet dataset, decoded into memory."""
    if not data_dir:
        raise DataError(f"`data_dir` is required for {name}: a directory holding train-*.parquet and test-*.parquet")
    if not os.path.isdir(data_dir):
        raise DataError(f"`data_dir` {data_dir} does not exist (expected train-*.parquet, test-*.parquet)")
    train_files = split_files(data_dir, "train")
    if not train_files:
        raise DataError(f"`data_dir` {data_dir} has no train-*.parquet (Hugging Face Parquet layout)")
    first: list = []  # the first image's size: every split's images must have it
    x, y, schema, label_col = read_split(train_files, image_size, image_column, label_column, first)
    names = class_names(schema, label_col, data_dir, train_files[0])
    if names is None:  # the labels are the classes: they must be 0..K-1, each with rows
        _check_dense(y, train_files[0], data_dir)
        names = tuple(str(i) for i in range(int(y.max()) + 1))
    _check_labels(y, len(names), train_files[0])
    counts = torch.bincount(y, minlength=len(names))
    if (counts == 0).any():
        c = int((counts == 0).nonzero()[0])
        raise DataError(f"{train_files[0]}: class {c} ({names[c]!r}) has no rows in the train split; every class "
                        "needs training images (add them, or drop the class from the class names)")
    if mean is None:
        mean, std = channel_stats(x)
        flat = [c for c, v in enumerate(std) if v == 0]
        if flat:
            raise DataError(f"{train_files[0]}: channel {flat[0]} has one value in every training image; "
                            "normalisation divides by its spread")
    info = DatasetInfo(name, len(names), names, image_size, tuple(mean), tuple(std), False)
    sets = [TensorImageSet(x, y, info)]
    for split in ("test", "validation"):
        files = split_files(data_dir, split)
        if not files:
            sets.append(None)
            continue
        xs, ys, _, _ = read_split(files, image_size, image_column, label_column, first)
        _check_labels(ys, len(names), files[0])
        sets.append(TensorImageSet(xs, ys, info))
    return tuple(sets)


def _check_dense(labels: torch.Tensor, path: str, data_dir: str) -> None:
    """Without class names, labels must be 0..K-1 with rows for each: a gap would silently be a class
    without images (labels 0, 5 and 99 would make 100 classes)."""
    present = torch.unique(labels)
    if int(present.min()) < 0:
        raise DataError(f"{path}: label {int(present.min())} is negative")
    if len(present) != int(present.max()) + 1:
        gap = next(i for i in range(int(present.max()) + 1) if i not in set(present.tolist()))
        raise DataError(f"{path}: the train split has labels up to {int(present.max())} but no rows of label {gap} "
                        f"({int(present.max()) + 1 - len(present)} labels without rows) and no class names; "
                        f"name the classes (a class map: {os.path.join(data_dir, 'classes.txt')}, one name a "
                        "line in label order) or number them 0..K-1")


def native_size(data_dir: str) -> int | None:
    """The side of the dataset's first training image (the `parquet` preset's image size)."""
    files = split_files(data_dir, "train") if data_dir and os.path.isdir(data_dir) else []
    if not files:
        return None
    pf = _open(files[0])
    col = pick_column(pf.schema_arrow, None, IMAGE_COLUMNS, "image", files[0])
    try:
        batch = next(pf.iter_batches(batch_size=1, columns=[col]), None)
        blob = batch.column(0)[0].as_py() if batch is not None and batch.num_rows else None
    except (pa.ArrowException, OSError) as e:
        raise _damaged(files[0], e) from None
    if batch is None or not batch.num_rows:
        raise DataError(f"{files[0]}: the split holds no rows")
    return int(_decode(blob, files[0], 0, None).shape[-1])


register(DatasetSpec("parquet", lambda data_dir, size, **o: load_parquet_sets(data_dir, size, **o),
                     "any image-classification dataset in the Hugging Face Parquet layout (`data_dir`)",
                     options=("image_column", "label_column"), native_size=native_size))
