"""Shards: the unit of synthesis work, planned, seeded and computed in process.

A shard is one IPC index for a block of classes, optimised as one batch (the
authors put all classes of one IPC index in a batch, so BatchNorm statistics
see many classes at once). Shards are disjoint, planned deterministically from
the configuration alone, and each has a seed derived from the run seed and
the shard's content, so its images do not depend on who computes them.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..data import ImageSet
from ..errors import Diverged
from ..store.shards import ShardStore
from .augment import normalize, to_float
from .configs import RecoverConfig
from .progress import Progress
from .real_init import confident_init
from .recover import synthesize

log = logging.getLogger("scdd_ray")


@dataclass(frozen=True)
class Shard:
    """A block of classes at one or more consecutive IPC indices, optimised as one batch
    (rows: every class of the first index, then of the next)."""

    ipc_index: int  # the first IPC index
    classes: tuple[int, ...]
    ipc_count: int = 1

    @property
    def id(self) -> str:
        last = "" if self.ipc_count == 1 else f"-{self.ipc_index + self.ipc_count - 1:04d}"
        return f"ipc{self.ipc_index:04d}{last}-c{self.classes[0]:05d}-{self.classes[-1]:05d}"

    def rows(self) -> tuple[list[int], list[int]]:
        """(class id, ipc index) of each image of the batch."""
        pairs = [(c, j) for j in range(self.ipc_index, self.ipc_index + self.ipc_count) for c in self.classes]
        return [c for c, _ in pairs], [j for _, j in pairs]

    def __len__(self) -> int:
        return len(self.classes) * self.ipc_count


def plan_shards(num_classes: int, ipc: int, classes_per_batch: int, ipc_per_shard: int = 1) -> list[Shard]:
    """Disjoint shards covering every (class, ipc index) pair exactly once.

    A shard holds `classes_per_batch` classes at `ipc_per_shard` consecutive
    IPC indices: with few classes (CIFAR-10), several indices make a batch
    large enough for meaningful BatchNorm statistics.
    """
    k = max(1, min(classes_per_batch, num_classes))
    m = max(1, min(ipc_per_shard, ipc))
    return [Shard(j, tuple(range(s, min(s + k, num_classes))), min(m, ipc - j))
            for j in range(0, ipc, m) for s in range(0, num_classes, k)]


def shard_seed(run_seed: int, shard: Shard) -> int:
    digest = hashlib.sha256(f"{run_seed}:{shard.id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def real_init(train: ImageSet, shard: Shard, seed: int, mean, std) -> torch.Tensor:
    """One random real training image for each row of the shard, normalised (for `recover.init` real)."""
    rng = np.random.RandomState(seed)
    idx = [int(rng.choice(train.indices_of_class(c))) for c in shard.rows()[0]]
    return normalize(to_float(train.load(idx)), mean, std)


def recover_shard(model: nn.Module, shard: Shard, cfg: RecoverConfig, mean, std, image_size: int, run_seed: int,
                  device="cpu", train: ImageSet | None = None, on_step=None, class_stats=None):
    """Synthesise one shard; returns (RecoverResult, class_ids, ipc_indices). `class_stats`: the model's
    per-class BN statistics, for `recover.class_bn_coef`."""
    seed = shard_seed(run_seed, shard)
    init = None
    classes, ipc_indices = shard.rows()
    if cfg.init == "real":
        if train is None:
            raise ValueError("`recover.init` real needs the training split")
        if cfg.init_pool > 0:  # chosen by the model's confidence, one or several patches each
            init = confident_init(model, train, classes, ipc_indices, cfg, image_size, mean, std, run_seed, device)
        else:
            init = real_init(train, shard, seed, mean, std)
    targets = torch.tensor(classes, dtype=torch.long)
    res = synthesize(model, targets, cfg, mean, std, image_size, seed, device=device, init=init, on_step=on_step,
                     class_stats=class_stats)
    if not (math.isfinite(res.loss_ce) and math.isfinite(res.loss_bn)):  # the images are NaN: never stored
        raise Diverged(f"recover stopped at shard {shard.id}: its loss is {res.loss_ce:g} (cross entropy) + "
                       f"{res.loss_bn:g} (BN); the backbone's outputs or the recover settings (`recover.lr`, "
                       "`recover.bn_coef`) make it diverge; finished shards are kept")
    return res, classes, ipc_indices


def run_local(model: nn.Module, shards: list[Shard], store: ShardStore, cfg: RecoverConfig, mean, std,
              image_size: int, run_seed: int, device="cpu", train: ImageSet | None = None,
              class_stats=None) -> dict:
    """Compute every shard the store has not recorded yet, in this process."""
    done = store.done()
    todo = [s for s in shards if s.id not in done]
    t0 = time.perf_counter()
    images_done = 0
    with Progress(sum(len(s) for s in todo), "recover", "img") as bar:
        for shard in todo:
            res, cls, ipc = recover_shard(model, shard, cfg, mean, std, image_size, run_seed, device, train,
                                          class_stats=class_stats)
            store.write_shard(shard.id, cls, ipc, res.images,
                              extra={"loss_ce": res.loss_ce, "loss_bn": res.loss_bn, "seconds": res.seconds})
            images_done += len(shard)
            bar.update(len(shard), ce=f"{res.loss_ce:.3f}", bn=f"{res.loss_bn:.3f}")
    return {"shards_total": len(shards), "shards_computed": len(todo), "images_computed": images_done,
            "seconds": time.perf_counter() - t0, "num_workers": 1}
