import os

import numpy as np
import pytest
import torch
from helpers import make_cifar, make_imagefolder

from scdd_ray.data import DataError, dataset_info, iterate, load_split, sample_per_class


def test_digits_splits_are_fixed_disjoint_and_stratified():
    tr = load_split("digits", "train", image_size=16)
    te = load_split("digits", "test", image_size=16)
    va = load_split("digits", "val", image_size=16)
    nv = load_split("digits", "train-noval", image_size=16)
    assert len(tr) + len(te) == 1797
    assert len(va) + len(nv) == len(tr)
    assert tr.images.shape[1:] == (3, 16, 16) and tr.images.dtype == torch.uint8
    # three identical channels: the source is grayscale
    assert torch.equal(tr.images[:, 0], tr.images[:, 1])
    assert tr.info.grayscale and tr.info.num_classes == 10
    counts = np.bincount(te.labels.numpy(), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class
    # val is a subset of train, train-noval the rest
    tr_set = {bytes(x.numpy().tobytes()) for x in tr.images}
    assert all(bytes(x.numpy().tobytes()) in tr_set for x in va.images[:20])
    again = load_split("digits", "test", image_size=16)
    assert torch.equal(again.images, te.images)


def test_cifar_layout_is_read_from_disk(tmp_path):
    root = make_cifar(tmp_path, "cifar10", per_class=5)
    tr = load_split("cifar10", "train", str(tmp_path))
    te = load_split("cifar10", "test", str(tmp_path))
    assert tr.info.class_names[0] == "c0" and tr.info.num_classes == 10
    assert tr.images.shape[1:] == (3, 32, 32) and len(te) == 20
    # data_dir may also be the cifar folder itself
    assert len(load_split("cifar10", "train", os.path.join(root, "cifar-10-batches-py"))) == len(tr)


def test_cifar100_layout(tmp_path):
    make_cifar(tmp_path, "cifar100", per_class=2)
    tr = load_split("cifar100", "train", str(tmp_path), image_size=16)
    assert tr.info.num_classes == 100 and tr.images.shape[-1] == 16 and len(tr) == 200


def test_cifar_errors_say_what_was_expected_where(tmp_path):
    with pytest.raises(DataError, match="`data_dir` is required") as e:  # the field; the CLI shows its flag
        load_split("cifar100", "train", None)
    assert e.value.render({"data_dir": "--data-dir"}.get).startswith("--data-dir is required")
    with pytest.raises(DataError, match="does not exist"):
        load_split("cifar100", "train", str(tmp_path / "nope"))
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"junk")
    with pytest.raises(DataError, match="expected cifar-100-python/ with train, test, meta"):
        load_split("cifar100", "train", str(tmp_path))


def test_imagefolder_layout(tmp_path):
    make_imagefolder(tmp_path, per_class=5)
    tr = load_split("imagefolder", "train", str(tmp_path), image_size=16)
    te = load_split("imagefolder", "test", str(tmp_path), image_size=16)
    assert tr.info.class_names == ("cat", "dog", "eel") and len(tr) == 15 and len(te) == 6
    x, y = next(iter(iterate(te, 4)))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8
    assert te.labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DataError, match="missing"):
        dataset_info("imagefolder", str(tmp_path / "train"), 16)


def test_sample_per_class_is_seeded_and_distinct():
    tr = load_split("digits", "train", image_size=16)
    a, pos = sample_per_class(tr, 5, seed=3)
    b, _ = sample_per_class(tr, 5, seed=3)
    c, _ = sample_per_class(tr, 5, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == 50
    assert np.array_equal(np.bincount(tr.labels.numpy()[a]), [5] * 10)
    assert pos.tolist()[:5] == [0, 1, 2, 3, 4]


def test_a_registered_dataset_works_everywhere_by_name(monkeypatch, tmp_path):
    """Adding a dataset is one registered spec and its preset file: configs, splits and presets follow from its
    name."""
    import yaml

    from scdd_ray import presets
    from scdd_ray.config import build_distill_config
    from scdd_ray.data import registry
    from scdd_ray.data.synthetic import load_synthetic_sets

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(registry.DatasetSpec("toy", lambda d, size: load_synthetic_sets(size, num_classes=3),
                                           "three colour blobs", val_fraction=0.5))
    for f in os.listdir(presets.DIR):  # the package's presets, and the new dataset's beside them
        if f.endswith(".yaml"):
            (tmp_path / f).write_text(open(os.path.join(presets.DIR, f)).read())
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({"extends": "synthetic", "ipc": 5}))
    monkeypatch.setattr(presets, "DIR", str(tmp_path))
    assert "toy" in registry.names()
    cfg = build_distill_config("toy", "out", {})
    assert cfg.ipc == 5 and cfg.image_size == presets.load("synthetic", False)["image_size"]
    train, val = load_split("toy", "train", None, 16), load_split("toy", "val", None, 16)
    assert train.info.num_classes == 3 and len(val) == len(train) // 2
    with pytest.raises(registry.ConfigError, match="unknown value 'nope'"):
        registry.get("nope")
