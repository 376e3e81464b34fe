"""Synthesis engine: shard planning and execution.

A shard is one IPC index for a block of classes, optimised as one batch (the
authors put all classes of one IPC index in a batch, so BatchNorm statistics
see many classes at once). Shards are disjoint, planned deterministically from
the configuration alone, and each has a seed derived from the run seed and
the shard's content, so its images do not depend on who computes them.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .augment import normalize, to_float
from .config import RecoverConfig
from .data import ImageSet
from .models import frozen
from .progress import Progress
from .recover import synthesize
from .store import ShardStore

log = logging.getLogger("scdd_ray")


@dataclass(frozen=True)
class Shard:
    ipc_index: int
    classes: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"ipc{self.ipc_index:04d}-c{self.classes[0]:05d}-{self.classes[-1]:05d}"

    def __len__(self) -> int:
        return len(self.classes)


def plan_shards(num_classes: int, ipc: int, classes_per_batch: int) -> list[Shard]:
    """Disjoint shards covering every (class, ipc index) pair exactly once."""
    k = max(1, min(classes_per_batch, num_classes))
    return [Shard(j, tuple(range(s, min(s + k, num_classes))))
            for j in range(ipc) for s in range(0, num_classes, k)]


def shard_seed(run_seed: int, shard: Shard) -> int:
    digest = hashlib.sha256(f"{run_seed}:{shard.id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def real_init(train: ImageSet, shard: Shard, seed: int, mean, std) -> torch.Tensor:
    """One random real training image of each class of the shard, normalised (for --init real)."""
    rng = np.random.RandomState(seed)
    idx = [int(rng.choice(train.indices_of_class(c))) for c in shard.classes]
    return normalize(to_float(train.load(idx)), mean, std)


def recover_shard(model: nn.Module, shard: Shard, cfg: RecoverConfig, mean, std, image_size: int, run_seed: int,
                  device="cpu", train: ImageSet | None = None, on_step=None):
    """Synthesise one shard; returns (RecoverResult, class_ids, ipc_indices)."""
    seed = shard_seed(run_seed, shard)
    init = None
    if cfg.init == "real":
        if train is None:
            raise ValueError("--init real needs the training split")
        init = real_init(train, shard, seed, mean, std)
    targets = torch.tensor(shard.classes, dtype=torch.long)
    res = synthesize(model, targets, cfg, mean, std, image_size, seed, device=device, init=init, on_step=on_step)
    return res, list(shard.classes), [shard.ipc_index] * len(shard)


def run_local(model: nn.Module, shards: list[Shard], store: ShardStore, cfg: RecoverConfig, mean, std,
              image_size: int, run_seed: int, device="cpu", train: ImageSet | None = None) -> dict:
    """Compute every shard the store has not recorded yet, in this process."""
    done = store.done()
    todo = [s for s in shards if s.id not in done]
    t0 = time.perf_counter()
    images_done = 0
    with Progress(sum(len(s) for s in todo), "recover", "img") as bar:
        for shard in todo:
            res, cls, ipc = recover_shard(model, shard, cfg, mean, std, image_size, run_seed, device, train)
            store.write_shard(shard.id, cls, ipc, res.images,
                              extra={"loss_ce": res.loss_ce, "loss_bn": res.loss_bn, "seconds": res.seconds})
            images_done += len(shard)
            bar.update(len(shard), ce=f"{res.loss_ce:.3f}", bn=f"{res.loss_bn:.3f}")
    return {"shards_total": len(shards), "shards_computed": len(todo), "images_computed": images_done,
            "seconds": time.perf_counter() - t0, "num_workers": 1}


# --- Ray execution ------------------------------------------------------------

class EngineError(RuntimeError):
    """A run that cannot finish (a shard failed too often); names the shard."""


@dataclass(frozen=True)
class Fault:
    """Test hook: the worker computing `shard_id` dies (os._exit) at `iteration` on its first attempt."""

    shard_id: str
    iteration: int = 1


class SynthesisWorker:
    """One frozen backbone replica on one GPU or a fixed number of CPU threads.

    Ray actor class (wrapped with ray.remote by `start_workers`); `run`
    synthesises one shard and returns the images to the driver, which alone
    writes shards and the manifest.
    """

    def __init__(self, ckpt, cfg: RecoverConfig, image_size: int, run_seed: int, threads: int, use_gpu: bool,
                 train=None, fault: Fault | None = None):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = frozen(ckpt.build().to(self.device, memory_format=torch.channels_last))
        self.mean, self.std = ckpt.mean, ckpt.std
        self.cfg, self.image_size, self.run_seed, self.train, self.fault = cfg, image_size, run_seed, train, fault

    def ready(self) -> bool:
        return True

    def run(self, shard: Shard, attempt: int):
        on_step = None
        if self.fault is not None and self.fault.shard_id == shard.id and attempt == 0:
            at = self.fault.iteration

            def on_step(it):
                if it == at:
                    import os

                    os._exit(1)  # a hard crash, as an OOM kill or a lost node would be
        res, cls, ipc = recover_shard(self.model, shard, self.cfg, self.mean, self.std, self.image_size,
                                      self.run_seed, self.device, self.train, on_step)
        return shard.id, res.images, cls, ipc, {"loss_ce": res.loss_ce, "loss_bn": res.loss_bn,
                                                 "seconds": res.seconds}


def run_ray(ckpt, shards: list[Shard], store: ShardStore, cfg: RecoverConfig, image_size: int, run_seed: int, *,
            num_workers: int, use_gpu: bool, threads: int = 1, train: ImageSet | None = None, max_tries: int = 3,
            fault: Fault | None = None, on_result=None) -> dict:
    """Compute every shard the store lacks on `num_workers` Ray actors.

    Actors pull the next shard when they finish one; a dead actor is replaced
    and its shard re-queued; a shard failing `max_tries` times stops the run.
    """
    import collections

    import ray
    from ray.exceptions import RayActorError, RayTaskError

    done = store.done()
    todo = collections.deque(s for s in shards if s.id not in done)
    if not todo:
        return {"shards_total": len(shards), "shards_computed": 0, "images_computed": 0, "seconds": 0.0,
                "num_workers": num_workers, "restarts": 0}
    n = min(num_workers, len(todo))
    # The backbone (and the real images for --init real) go to the object store once.
    ckpt_ref = ray.put(ckpt)
    train_ref = ray.put(train) if train is not None else None
    opts = {"num_gpus": 1, "num_cpus": threads} if use_gpu else {"num_cpus": threads}
    Worker = ray.remote(SynthesisWorker).options(**opts)

    def start():
        return Worker.remote(ckpt_ref, cfg, image_size, run_seed, threads, use_gpu, train_ref, fault)

    t_start = time.perf_counter()
    actors = [start() for _ in range(n)]
    try:  # start-up (process, imports, model build) reported apart from synthesis
        ray.get([h.ready.remote() for h in actors])
    except RayActorError:
        pass  # a replacement is started when its first shard fails
    startup = time.perf_counter() - t_start
    idle = list(range(n))
    inflight: dict = {}
    tries: collections.Counter = collections.Counter()
    restarts = computed = images = 0
    t0 = time.perf_counter()
    log.info("recover: %d workers ready in %.1fs", n, startup)
    with Progress(sum(len(s) for s in todo), f"recover ({n} workers)", "img") as bar:
        while todo or inflight:
            while idle and todo:
                a, shard = idle.pop(), todo.popleft()
                inflight[actors[a].run.remote(shard, tries[shard.id])] = (a, shard)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            a, shard = inflight.pop(ready[0])
            try:
                sid, imgs, cls, ipc, stats = ray.get(ready[0])
            except (RayActorError, RayTaskError) as e:
                tries[shard.id] += 1
                reason = type(e).__name__
                if tries[shard.id] >= max_tries:
                    for h in actors:
                        ray.kill(h)
                    raise EngineError(f"shard {shard.id} failed {tries[shard.id]} times (last: {reason}); "
                                      "finished shards are kept, rerun to resume") from None
                log.warning("shard %s failed (%s), attempt %d of %d; re-queued", shard.id, reason, tries[shard.id],
                            max_tries)
                if isinstance(e, RayActorError):
                    ray.kill(actors[a])
                    actors[a] = start()
                    restarts += 1
                todo.appendleft(shard)
                idle.append(a)
                continue
            store.write_shard(sid, cls, ipc, imgs, extra=stats)
            computed += 1
            images += len(cls)
            idle.append(a)
            bar.update(len(cls), ce=f"{stats['loss_ce']:.3f}")
            if on_result is not None:
                on_result(sid)
    for h in actors:
        ray.kill(h)
    return {"shards_total": len(shards), "shards_computed": computed, "images_computed": images,
            "seconds": time.perf_counter() - t_start, "startup_seconds": startup,
            "synthesis_seconds": time.perf_counter() - t0, "num_workers": n, "restarts": restarts}


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join `address` (auto, host:port, ray://host:port) or start a private local Ray instance.

    Raises ConnectionError with a one-line reason when the cluster cannot be reached.
    """
    import os
    import socket

    import ray

    if address and address != "auto":
        hostport = address.split("://", 1)[-1]
        host, _, port = hostport.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            raise ConnectionError(f"cannot reach Ray cluster at {address} ({e.__class__.__name__})") from None
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"cannot join Ray cluster at {address}: {first}") from None


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
