"""Builders of small on-disk datasets in the real layouts users have."""
import os
import pickle

import numpy as np


def make_cifar(root, name="cifar10", per_class=6, num_classes=None, seed=0):
    """Write a tiny dataset in the CIFAR python pickle layout; returns data_dir."""
    rng = np.random.RandomState(seed)
    n_cls = num_classes or (10 if name == "cifar10" else 100)
    if name == "cifar10":
        folder, train_files, test_files = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        label_key, meta_name, meta = "labels", "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(n_cls)]}
    else:
        folder, train_files, test_files = "cifar-100-python", ["train"], ["test"]
        label_key, meta_name = "fine_labels", "meta"
        meta = {b"fine_label_names": [f"c{i}".encode() for i in range(n_cls)]}
    d = os.path.join(root, folder)
    os.makedirs(d, exist_ok=True)

    def batch(n_per):
        labels = np.repeat(np.arange(n_cls), n_per)
        base = rng.randint(0, 255, size=(n_cls, 3072))
        data = np.clip(base[labels] + rng.randint(-20, 20, size=(len(labels), 3072)), 0, 255).astype(np.uint8)
        return {b"data": data, label_key.encode(): labels.tolist()}

    for f in train_files:
        with open(os.path.join(d, f), "wb") as fh:
            pickle.dump(batch(max(1, per_class // len(train_files)) if name == "cifar10" else per_class), fh)
    for f in test_files:
        with open(os.path.join(d, f), "wb") as fh:
            pickle.dump(batch(2), fh)
    with open(os.path.join(d, meta_name), "wb") as fh:
        pickle.dump(meta, fh)
    return str(root)


def make_imagefolder(root, classes=("cat", "dog", "eel"), per_class=5, size=20, seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split, n in (("train", per_class), ("val", 2)):
        for ci, c in enumerate(classes):
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                arr = np.full((size, size + 4, 3), 40 * ci, np.uint8) + rng.randint(0, 30, (size, size + 4, 3)).astype(np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"img{i}.jpg" if i % 2 else f"img{i}.png"))
    return str(root)
