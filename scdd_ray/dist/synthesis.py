"""Synthesis on Ray actors: each holds one frozen backbone replica on one GPU
or a fixed number of CPU threads and computes whole shards; the driver alone
writes shards and the manifest.
"""
from __future__ import annotations

import collections
import logging
import time

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from ..core.configs import RecoverConfig
from ..core.progress import Progress
from ..core.shards import Shard, recover_shard
from ..data import ImageSet
from ..errors import EngineError
from ..models import frozen
from ..store import ShardStore
from .cluster import worker_error

log = logging.getLogger("scdd_ray")


class SynthesisWorker:
    """Ray actor class (wrapped with ray.remote by `run_ray`); `run` synthesises one shard."""

    def __init__(self, ckpt, cfg: RecoverConfig, image_size: int, run_seed: int, threads: int, use_gpu: bool,
                 train=None):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = frozen(ckpt.build().to(self.device, memory_format=torch.channels_last))
        self.mean, self.std = ckpt.mean, ckpt.std
        self.cfg, self.image_size, self.run_seed, self.train = cfg, image_size, run_seed, train

    def ready(self) -> bool:
        return True

    def run(self, shard: Shard, attempt: int):
        """(shard id, uint8 images, class ids, ipc indices, stats); `attempt` counts earlier failures."""
        res, cls, ipc = recover_shard(self.model, shard, self.cfg, self.mean, self.std, self.image_size,
                                      self.run_seed, self.device, self.train)
        return shard.id, res.images, cls, ipc, {"loss_ce": res.loss_ce, "loss_bn": res.loss_bn,
                                                 "seconds": res.seconds}


def _finished(shards: list[Shard], num_workers: int) -> dict:
    return {"shards_total": len(shards), "shards_computed": 0, "images_computed": 0, "seconds": 0.0,
            "num_workers": num_workers, "restarts": 0}


def run_ray(ckpt, shards: list[Shard], store: ShardStore, cfg: RecoverConfig, image_size: int, run_seed: int, *,
            num_workers: int, use_gpu: bool, threads: int = 1, train: ImageSet | None = None, max_tries: int = 3,
            on_result=None, worker_cls: type = SynthesisWorker) -> dict:
    """Compute every shard the store lacks on `num_workers` Ray actors of `worker_cls`.

    Actors pull the next shard when they finish one; a dead actor is replaced
    and its shard re-queued; a shard failing `max_tries` times stops the run.
    `on_result(shard_id)` runs after each shard is written.
    """
    done = store.done()
    todo = collections.deque(s for s in shards if s.id not in done)
    if not todo:
        return _finished(shards, num_workers)
    n = min(num_workers, len(todo))
    # The backbone (and the real images for `init real`) go to the object store once.
    ckpt_ref = ray.put(ckpt)
    train_ref = ray.put(train) if train is not None else None
    opts = {"num_gpus": 1, "num_cpus": threads} if use_gpu else {"num_cpus": threads}
    actor = ray.remote(worker_cls).options(**opts)

    def start():
        return actor.remote(ckpt_ref, cfg, image_size, run_seed, threads, use_gpu, train_ref)

    t_start = time.perf_counter()
    actors = [start() for _ in range(n)]
    try:  # start-up (process, imports, model build) reported apart from synthesis
        ray.get([h.ready.remote() for h in actors])
    except RayActorError:
        pass  # a replacement is started when its first shard fails
    startup = time.perf_counter() - t_start
    log.info("recover: %d workers ready in %.1fs", n, startup)
    t0 = time.perf_counter()
    try:
        with Progress(sum(len(s) for s in todo), f"recover ({n} workers)", "img") as bar:
            computed, images, restarts = _pull_loop(actors, start, todo, store, max_tries, bar, on_result)
    finally:
        for h in actors:
            ray.kill(h)
    return {"shards_total": len(shards), "shards_computed": computed, "images_computed": images,
            "seconds": time.perf_counter() - t_start, "startup_seconds": startup,
            "synthesis_seconds": time.perf_counter() - t0, "num_workers": n, "restarts": restarts}


def _pull_loop(actors: list, start, todo: collections.deque, store: ShardStore, max_tries: int, bar,
               on_result) -> tuple[int, int, int]:
    """Hand shards to idle actors until none is left; returns (shards, images, actor restarts)."""
    idle = list(range(len(actors)))
    inflight: dict = {}
    tries: collections.Counter = collections.Counter()
    restarts = computed = images = 0
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
            reason = worker_error(e)
            if tries[shard.id] >= max_tries:
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
    return computed, images, restarts
