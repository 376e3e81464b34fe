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
from ..errors import Diverged, EngineError
from ..models import frozen
from ..store import ShardStore
from .cluster import free_resources, placeable_now, placement, worker_error

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


class _Workers:
    """The synthesis actors of one run: started, replaced when they die, and handed work only once
    started, so that a worker the cluster cannot place holds no shard and stops nothing."""

    def __init__(self, start, n: int, placeable: tuple[int, str], startup_timeout: float, max_tries: int):
        self.start, self.startup_timeout, self.max_tries = start, startup_timeout, max_tries
        self.placeable = placeable  # (how many the cluster had room for when the run began, its free resources)
        self.actors: list = [None] * n
        self.pending: dict = {}  # ready() ref -> slot
        self.idle: list[int] = []
        self.restarts = self.start_failures = 0
        for a in range(n):
            self.launch(a)

    def launch(self, a: int) -> None:
        self.actors[a] = self.start()
        self.pending[self.actors[a].ready.remote()] = a

    def replace(self, a: int) -> None:
        ray.kill(self.actors[a])
        self.restarts += 1
        self.launch(a)

    def started(self, ref) -> None:
        """A ready() call returned: the worker takes work, or is replaced if it died starting."""
        a = self.pending.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as e:
            self.start_failures += 1
            if self.start_failures >= self.max_tries * len(self.actors):
                raise EngineError(f"synthesis workers failed to start {self.start_failures} times (last: "
                                  f"{type(e).__name__}); finished shards are kept, rerun to resume") from None
            log.warning("recover: a worker died while starting (%s); starting another", type(e).__name__)
            self.replace(a)
            return
        self.idle.append(a)

    def wait_first(self, poll: float) -> float:
        """Wait for the workers the cluster had room for (at least one), a log line per `poll` seconds
        and at most `startup_timeout` seconds; the others join when the cluster places them. Returns
        the seconds waited."""
        room, free = self.placeable
        want = max(1, min(room, len(self.actors)))
        if room < len(self.actors):
            log.warning("recover: the Ray cluster has room for %d of %d workers now (%s); the others join "
                        "when it places them", room, len(self.actors), free)
        t0 = time.perf_counter()
        while self.pending and len(self.idle) < want:
            waited = time.perf_counter() - t0
            if waited >= self.startup_timeout:
                self.no_worker_check(waited)
                break
            ready, _ = ray.wait(list(self.pending), num_returns=min(len(self.pending), want - len(self.idle)),
                                timeout=min(poll, self.startup_timeout - waited))
            for ref in ready:
                self.started(ref)
            if not ready:  # the wait ran out: say what it waits for
                log.info("recover: %d of %d workers started after %.0fs; waiting for the cluster (%s)",
                         len(self.idle), len(self.actors), time.perf_counter() - t0, free_resources())
        return time.perf_counter() - t0

    def no_worker_check(self, waited: float) -> None:
        """Stop the run when no worker has started for `startup_timeout` seconds and none is working."""
        if not self.idle:
            raise EngineError(f"no synthesis worker could start within {waited:.0f}s; the Ray cluster reports "
                              f"{free_resources()}; finished shards are kept, rerun to resume")

    def kill_all(self, timeout: float = 10.0) -> None:
        """Kill every actor and wait (boundedly) until they are gone: ray.kill returns at once, and
        a run started right after (bench scaling) would find their CPUs still taken."""
        handles = [h for h in self.actors if h is not None]
        for h in handles:
            ray.kill(h)
        ray.wait([h.ready.remote() for h in handles], num_returns=len(handles), timeout=timeout)


def run_ray(ckpt, shards: list[Shard], store: ShardStore, cfg: RecoverConfig, image_size: int, run_seed: int, *,
            num_workers: int, use_gpu: bool, threads: int = 1, train: ImageSet | None = None, max_tries: int = 3,
            on_result=None, worker_cls: type = SynthesisWorker, startup_timeout: float = 300.0,
            poll: float = 30.0) -> dict:
    """Compute every shard the store lacks on `num_workers` Ray actors of `worker_cls`.

    Actors pull the next shard when they finish one; a dead actor is replaced
    and its shard re-queued; a shard failing `max_tries` times stops the run.
    A worker count the cluster can never place is refused (ConfigError);
    workers it cannot place now are waited for at most `startup_timeout`
    seconds, then the run goes on with those that started. No wait on the
    cluster is longer than `poll` seconds without a log line.
    `on_result(shard_id)` runs after each shard is written.
    """
    done = store.done()
    todo = collections.deque(s for s in shards if s.id not in done)
    if not todo:
        return _finished(shards, num_workers)
    n = min(num_workers, len(todo))
    placement(n, use_gpu, threads, "num_gpus" if use_gpu else "num_workers")
    # The backbone (and the real images for `init real`) go to the object store once.
    ckpt_ref = ray.put(ckpt)
    train_ref = ray.put(train) if train is not None else None
    opts = {"num_gpus": 1, "num_cpus": threads} if use_gpu else {"num_cpus": threads}
    actor = ray.remote(worker_cls).options(**opts)

    def start():
        return actor.remote(ckpt_ref, cfg, image_size, run_seed, threads, use_gpu, train_ref)

    t_start = time.perf_counter()
    workers = _Workers(start, n, placeable_now(use_gpu, threads), startup_timeout, max_tries)
    try:  # start-up (process, imports, model build) reported apart from synthesis
        startup = workers.wait_first(poll)
        log.info("recover: %d workers ready in %.1fs", len(workers.idle), startup)
        t0 = time.perf_counter()
        with Progress(sum(len(s) for s in todo), f"recover ({n} workers)", "img") as bar:
            computed, images = _pull_loop(workers, todo, store, max_tries, bar, on_result, poll)
    finally:
        workers.kill_all()
    return {"shards_total": len(shards), "shards_computed": computed, "images_computed": images,
            "seconds": time.perf_counter() - t_start, "startup_seconds": startup,
            "synthesis_seconds": time.perf_counter() - t0, "num_workers": n, "restarts": workers.restarts}


def _pull_loop(workers: _Workers, todo: collections.deque, store: ShardStore, max_tries: int, bar, on_result,
               poll: float) -> tuple[int, int]:
    """Hand shards to started, idle actors until none is left; returns (shards, images)."""
    inflight: dict = {}
    tries: collections.Counter = collections.Counter()
    computed = images = 0
    idle_since = time.perf_counter()
    while todo or inflight:
        while workers.idle and todo:
            a, shard = workers.idle.pop(), todo.popleft()
            inflight[workers.actors[a].run.remote(shard, tries[shard.id])] = (a, shard)
        ready, _ = ray.wait(list(inflight) + list(workers.pending), num_returns=1, timeout=poll)
        if not ready:
            log.info("recover: %d shards left, %d running, %d workers waiting to start (%s)", len(todo) + len(inflight),
                     len(inflight), len(workers.pending), free_resources())
            if not inflight and time.perf_counter() - idle_since >= workers.startup_timeout:
                workers.no_worker_check(time.perf_counter() - idle_since)
            continue
        if ready[0] in workers.pending:
            workers.started(ready[0])
            continue
        a, shard = inflight.pop(ready[0])
        try:
            sid, imgs, cls, ipc, stats = ray.get(ready[0])
        except (RayActorError, RayTaskError) as e:
            if isinstance(getattr(e, "cause", None), Diverged):  # it would diverge again: not retried
                raise Diverged(e.cause.message) from None
            tries[shard.id] += 1
            reason = worker_error(e)
            if tries[shard.id] >= max_tries:
                raise EngineError(f"shard {shard.id} failed {tries[shard.id]} times (last: {reason}); "
                                  "finished shards are kept, rerun to resume") from None
            log.warning("shard %s failed (%s), attempt %d of %d; re-queued", shard.id, reason, tries[shard.id],
                        max_tries)
            if isinstance(e, RayActorError):
                workers.replace(a)
            else:
                workers.idle.append(a)
            todo.appendleft(shard)
            idle_since = time.perf_counter()
            continue
        store.write_shard(sid, cls, ipc, imgs, extra=stats)
        computed += 1
        images += len(cls)
        workers.idle.append(a)
        idle_since = time.perf_counter()
        bar.update(len(cls), ce=f"{stats['loss_ce']:.3f}")
        if on_result is not None:
            on_result(sid)
    return computed, images
