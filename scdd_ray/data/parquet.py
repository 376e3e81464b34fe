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


def class_names(schema: pa.Schema, label_column: str, data_dir: str) -> tuple[str, ...] | None:
    """Class names from the schema metadata or DIR/classes.txt, in label order; None when nowhere."""
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if "classes" in meta:
        text = meta["classes"].strip()
        return tuple(json.loads(text)) if text.startswith("[") else tuple(c.strip() for c in text.split(","))
    if "huggingface" in meta:
        info = json.loads(meta["huggingface"]).get("info", {})
        names = info.get("features", {}).get(label_column, {}).get("names")
        if names:
            return tuple(names)
    txt = os.path.join(data_dir, "classes.txt")
    if os.path.isfile(txt):
        with open(txt) as f:
            return tuple(line.strip() for line in f if line.strip())
    return None


def _decode(blob, path: str, row: int, image_size: int) -> torch.Tensor:
    data = blob.get("bytes") if isinstance(blob, dict) else blob
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, TypeError, ValueError) as e:
        raise DataError(f"{path} row {row}: the image does not decode ({type(e).__name__})") from None
    if arr.shape[0] != arr.shape[1]:
        raise DataError(f"{path} row {row}: the image is {arr.shape[1]}x{arr.shape[0]}, not square")
    return resize_u8(torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0), image_size)[0]


def read_split(files: list[str], image_size: int, image_column: str | None, label_column: str | None):
    """(uint8 images, int64 labels, schema, label column) of the rows of `files`."""
    images, labels, schema, label_col = [], [], None, None
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__})") from None
        schema = schema or pf.schema_arrow
        img_col = pick_column(pf.schema_arrow, image_column, IMAGE_COLUMNS, "image", path)
        label_col = pick_column(pf.schema_arrow, label_column, LABEL_COLUMNS, "label", path)
        if not pa.types.is_integer(pf.schema_arrow.field(label_col).type):
            raise DataError(f"{path}: label column {label_col!r} holds {pf.schema_arrow.field(label_col).type}, "
                            "not integers")
        table = pf.read(columns=[img_col, label_col])
        offset = len(labels)
        for i, blob in enumerate(table.column(img_col).to_pylist()):
            images.append(_decode(blob, path, i, image_size))
        labels.extend(table.column(label_col).to_pylist())
        if any(v is None for v in labels[offset:]):
            raise DataError(f"{path}: label column {label_col!r} has empty values")
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
    x, y, schema, label_col = read_split(train_files, image_size, image_column, label_column)
    names = class_names(schema, label_col, data_dir) or tuple(str(i) for i in range(int(y.max()) + 1))
    _check_labels(y, len(names), train_files[0])
    if mean is None:
        mean, std = channel_stats(x)
    info = DatasetInfo(name, len(names), names, image_size, tuple(mean), tuple(std), False)
    sets = [TensorImageSet(x, y, info)]
    for split in ("test", "validation"):
        files = split_files(data_dir, split)
        if not files:
            sets.append(None)
            continue
        xs, ys, _, _ = read_split(files, image_size, image_column, label_column)
        _check_labels(ys, len(names), files[0])
        sets.append(TensorImageSet(xs, ys, info))
    return tuple(sets)


def native_size(data_dir: str) -> int | None:
    """The side of the dataset's first training image (the `parquet` preset's image size)."""
    files = split_files(data_dir, "train") if data_dir and os.path.isdir(data_dir) else []
    if not files:
        return None
    pf = pq.ParquetFile(files[0])
    col = pick_column(pf.schema_arrow, None, IMAGE_COLUMNS, "image", files[0])
    blob = next(pf.iter_batches(batch_size=1, columns=[col])).column(0)[0].as_py()
    with Image.open(io.BytesIO(blob.get("bytes") if isinstance(blob, dict) else blob)) as im:
        return im.size[0]


register(DatasetSpec("parquet", lambda data_dir, size, **o: load_parquet_sets(data_dir, size, **o),
                     "any image-classification dataset in the Hugging Face Parquet layout (`data_dir`)",
                     options=("image_column", "label_column"), native_size=native_size))
