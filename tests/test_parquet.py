"""Hugging Face Parquet datasets: both column conventions, struct and binary images,
class names, bad input as one line, and our own HF export read back."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_cli_errors import run_err

from scdd_ray.data import load_split
from scdd_ray.errors import DataError
from scdd_ray.exports import HF_FILE, hf_parquet

SHARED_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")
STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_hf(root, *, image_col="img", label_col="label", struct=True, classes=("a", "b", "c"), per_class=4,
            size=8, splits=("train", "test"), labels=None, blobs=None, meta_key="classes"):
    """A tiny HF-layout dataset; returns {split: (uint8 NCHW images, labels)} as written."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.RandomState(0)
    written = {}
    for split in splits:
        y = np.repeat(np.arange(len(classes)), per_class) if labels is None else np.asarray(labels)
        imgs = rng.randint(0, 256, (len(y), size, size, 3), dtype=np.uint8)
        data = blobs if blobs is not None else [_png(a) for a in imgs]
        col = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(data)], STRUCT) if struct \
            else pa.array(data, pa.binary())
        meta = {}
        if meta_key == "classes":
            meta["classes"] = ",".join(classes)
        elif meta_key == "huggingface":
            meta["huggingface"] = json.dumps({"info": {"features": {label_col: {"names": list(classes),
                                                                                 "_type": "ClassLabel"}}}})
        table = pa.table({image_col: col, label_col: pa.array(y, pa.int64())}).replace_schema_metadata(meta)
        pq.write_table(table, os.path.join(root, f"{split}-00000-of-00001.parquet"))
        written[split] = (torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y))
    return written


@pytest.mark.parametrize("image_col,label_col,struct,meta_key", [
    ("img", "label", True, "classes"),  # CIFAR-10 on the hub
    ("image", "label", False, "huggingface"),  # most hub datasets; plain binary images
    ("img", "fine_label", True, "huggingface"),  # CIFAR-100 on the hub
])
def test_reads_both_column_conventions(tmp_path, image_col, label_col, struct, meta_key):
    written = make_hf(tmp_path / f"d-{image_col}-{label_col}", image_col=image_col, label_col=label_col,
                      struct=struct, meta_key=meta_key, per_class=10)
    root = str(tmp_path / f"d-{image_col}-{label_col}")
    train, test = load_split("parquet", "train", root, 8), load_split("parquet", "test", root, 8)
    assert torch.equal(train.images, written["train"][0]) and torch.equal(train.labels, written["train"][1])
    assert torch.equal(test.images, written["test"][0])
    assert train.info.class_names == ("a", "b", "c") and train.info.num_classes == 3
    x = written["train"][0].double() / 255
    assert train.info.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()))
    val, rest = load_split("parquet", "val", root, 8), load_split("parquet", "train-noval", root, 8)
    assert len(val) == 3 and len(rest) == 27  # 10% of each class carved from train: there is no validation split


def test_a_validation_split_is_the_val_split_and_sizes_follow_the_data(tmp_path):
    written = make_hf(tmp_path, splits=("train", "test", "validation"), size=12)
    val = load_split("parquet", "val", str(tmp_path), 12)
    assert torch.equal(val.images, written["validation"][0])
    assert len(load_split("parquet", "train-noval", str(tmp_path), 12)) == len(written["train"][1])
    from scdd_ray.config import build_distill_config

    assert build_distill_config("parquet", "o", {"data_dir": str(tmp_path)}).image_size == 12  # the data's own
    assert load_split("parquet", "train", str(tmp_path), 24).images.shape[-1] == 24


def test_columns_named_by_flags_and_bad_datasets_are_one_line(tmp_path, capsys):
    make_hf(tmp_path / "pic", image_col="pic", label_col="cls")
    out = tmp_path / "run"
    base = ["distill", "--dataset", "parquet", "--out", str(out)]
    line = run_err(capsys, base + ["--data-dir", str(tmp_path / "pic")])
    assert "no image column" in line and "pic, cls" in line and "--image-column" in line
    assert load_split("parquet", "train", str(tmp_path / "pic"), 8, image_column="pic", label_column="cls")
    make_hf(tmp_path / "both", image_col="img")
    t = pq.read_table(tmp_path / "both" / "train-00000-of-00001.parquet")
    pq.write_table(t.append_column("image", t.column("img")), tmp_path / "both" / "train-00000-of-00001.parquet")
    line = run_err(capsys, base + ["--data-dir", str(tmp_path / "both")])
    assert "several image columns" in line and "img, label, image" in line
    make_hf(tmp_path / "range", labels=[0, 1, 2, 5])
    line = run_err(capsys, base + ["--data-dir", str(tmp_path / "range")])
    assert "label 5 is out of range for 3 classes" in line
    make_hf(tmp_path / "junk", labels=[0, 1], blobs=[_png(np.zeros((8, 8, 3), np.uint8)), b"not an image"])
    line = run_err(capsys, base + ["--data-dir", str(tmp_path / "junk")])
    assert "row 1: the image does not decode" in line
    line = run_err(capsys, ["distill", "--dataset", "digits", "--label-column", "y", "--out", str(out)])
    assert "--label-column" in line and "does not apply to dataset 'digits'" in line
    assert not out.exists()


def test_cifar10_accepts_the_parquet_layout(tmp_path):
    make_hf(tmp_path, classes=tuple(f"c{i}" for i in range(10)), per_class=2, size=32)
    test = load_split("cifar10", "test", str(tmp_path), 32)
    assert test.info.name == "cifar10" and test.info.mean == (0.4914, 0.4822, 0.4465) and len(test) == 20


def test_distilled_set_in_hf_layout_reads_back_as_a_parquet_dataset(tmp_path):
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    cls, ipc = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 0, 1, 0, 1])
    hf_parquet(str(tmp_path), images, cls, ipc, ("zero", "one, with a comma", "two"))
    back = load_split("parquet", "train", str(tmp_path / os.path.dirname(HF_FILE)), 16)
    assert torch.equal(back.images, images) and back.labels.tolist() == cls.tolist()
    assert back.info.class_names == ("zero", "one, with a comma", "two")
    import pandas as pd

    df = pd.read_parquet(tmp_path / HF_FILE)
    assert list(df.columns) == ["image", "label"] and df["image"][3]["path"] == "class001_id001.png"
    with pytest.raises(DataError, match="has no test split"):
        load_split("parquet", "test", str(tmp_path / os.path.dirname(HF_FILE)), 16)


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR10), reason="../shared/data/cifar10 is absent (real CIFAR-10)")
def test_real_cifar10_test_split():
    test = load_split("cifar10", "test", SHARED_CIFAR10, 32)
    assert len(test) == 10000 and test.images.shape[1:] == (3, 32, 32)
    assert np.bincount(test.labels.numpy()).tolist() == [1000] * 10
    assert test.info.class_names[:3] == ("airplane", "automobile", "bird")
