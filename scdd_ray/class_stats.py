"""The recovery model's per-class BatchNorm statistics (category-aware matching, `recover.class_bn_coef`):
gathered once from the run's training split and cached beside its squeezed models, named by the model's
weights and the split, so every run, table cell and seed that recovers from that model reads one file."""
from __future__ import annotations

import io
import logging
import os
import time

import torch

from .backbones import models_dir
from .core.augment import normalize, to_float
from .core.class_bn import class_statistics
from .data import iterate
from .locks import locked
from .models.checkpoint import Checkpoint, weights_digest
from .models.runtime import frozen
from .schema import DistillConfig
from .store.atomic import atomic_write_bytes

log = logging.getLogger("scdd_ray")
FORMAT = "scdd-class-bn-2"  # per layer: mean, variance, within-image variance
BATCH = 256


def stats_path(cfg: DistillConfig, digest: str) -> str:
    return os.path.join(models_dir(cfg), f"class-bn-{digest}-s{cfg.image_size}-{cfg.dataset}-{cfg.train_split}.pt")


def _read(path: str, digest: str) -> list | None:
    """The cached statistics at `path`, or None (gathered again) when there are none, or the file is damaged
    or another model's, as a damaged shard is computed again."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        ok = saved.get("format") == FORMAT and saved.get("weights") == digest
    except Exception as e:
        ok, why = False, type(e).__name__
    else:
        why = "another model's, or an older format"
    if not ok:
        log.warning("class BN statistics %s unusable (%s); gathering them again", path, why)
        return None
    return [tuple(layer) for layer in saved["layers"]]


def cached_class_statistics(cfg: DistillConfig, backbone: Checkpoint, device) -> list:
    """The per-class statistics of `backbone` on `cfg`'s training split (train-noval under holdout): read from
    the cache, or gathered (one forward over the split) and written there atomically."""
    digest = weights_digest(backbone)
    path = stats_path(cfg, digest)
    locks = os.path.join(os.path.dirname(os.path.abspath(path)), ".locks")  # out of sight, as squeeze_cached's
    os.makedirs(locks, exist_ok=True)
    with locked(os.path.join(locks, os.path.basename(path) + ".lock")):
        saved = _read(path, digest)
        if saved is not None:
            return saved
        t0 = time.perf_counter()
        train = cfg.split("train")
        model = frozen(backbone.build().to(device))
        batches = ((normalize(to_float(x.to(device)), backbone.mean, backbone.std), y)
                   for x, y in iterate(train, BATCH, device=device))
        layers = class_statistics(model, batches, train.info.num_classes)
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "weights": digest, "split": cfg.train_split,
                    "layers": [list(layer) for layer in layers]}, buf)
        atomic_write_bytes(path, buf.getvalue())
        log.info("class BN statistics of %d layers over %d images in %.0fs: %s", len(layers), len(train),
                 time.perf_counter() - t0, path)
        return layers
