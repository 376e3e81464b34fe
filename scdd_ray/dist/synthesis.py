"""Synthesis on Ray actors: each holds one frozen backbone replica on one GPU
or a fixed number of CPU threads and computes whole shards; the driver alone
writes shards and the manifest.

Fault tolerance is Ray's: an actor that dies (a kill, the OOM killer, a lost
node) is restarted by Ray (`max_restarts`) and the shard it held is retried on
it (`max_task_retries`; a worker's own error is retried too,
`retry_exceptions`), up to MAX_TRIES attempts per shard. Work is handed out by
Ray's `ActorPool` as actors free up. What Ray lacks, and this module adds: a
worker count the cluster can never place is refused up front, and a cluster
that places no worker within STARTUP_TIMEOUT stops the run instead of waiting
forever; workers it places later join the pool then.
"""
from __future__ import annotations

import logging
import os
import time

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util import ActorPool

from ..core.configs import RecoverConfig
from ..core.progress import Progress
from ..core.shards import Shard, recover_shard
from ..data import ImageSet
from ..errors import Diverged, EngineError
from ..models.runtime import frozen
from ..store.shards import ShardStore
from .cluster import free_resources, placeable_now, placement, worker_error

log = logging.getLogger("scdd_ray")
MAX_TRIES = 3  # attempts at one shard (and at starting one worker) before the run stops
STARTUP_TIMEOUT = 300.0  # seconds to wait for the cluster to place a first worker
POLL = 30.0  # no wait on the cluster is longer than this without a log line


class SynthesisWorker:
    """Ray actor class (wrapped with ray.remote by `run_ray`); `run` synthesises one shard.

    The backbone (and, for `init` real, the training images) come as object refs with each call, in a
    tuple (Ray passes it as it is), and are fetched once per process: a worker Ray restarts loads them
    again on its first call. Constructor arguments in the object store would make Ray warn at every
    actor start that a restart could fail without them.
    """

    def __init__(self, cfg: RecoverConfig, image_size: int, run_seed: int, threads: int, use_gpu: bool):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.cfg, self.image_size, self.run_seed = cfg, image_size, run_seed
        self.model = None

    def load(self, inputs: tuple) -> None:
        """Build the frozen backbone replica from `inputs` (checkpoint ref, training-images ref or None, per-class
        BN statistics ref or None)."""
        if self.model is None:
            ckpt_ref, train_ref, stats_ref = inputs
            ckpt = ray.get(ckpt_ref)
            self.model = frozen(ckpt.build().to(self.device, memory_format=torch.channels_last))
            self.mean, self.std = ckpt.mean, ckpt.std
            self.train = ray.get(train_ref) if train_ref is not None else None
            self.class_stats = ray.get(stats_ref) if stats_ref is not None else None

    def ready(self, inputs: tuple) -> int:
        self.load(inputs)
        return os.getpid()

    @ray.method(retry_exceptions=[RuntimeError])  # a diverged shard would diverge again: not retried
    def run(self, shard: Shard, inputs: tuple):
        """(shard id, uint8 images, class ids, ipc indices, stats); an error names the shard."""
        self.load(inputs)
        try:
            res, cls, ipc = recover_shard(self.model, shard, self.cfg, self.mean, self.std, self.image_size,
                                          self.run_seed, self.device, self.train, class_stats=self.class_stats)
        except Diverged:
            raise
        except Exception as e:  # the driver sees one line of it: say which shard, and what
            raise RuntimeError(f"shard {shard.id}: {type(e).__name__}: {e}") from None
        return shard.id, res.images, cls, ipc, {"loss_ce": res.loss_ce, "loss_bn": res.loss_bn,
                                                "seconds": res.seconds, "pid": os.getpid()}


def _finished(shards: list[Shard], num_workers: int) -> dict:
    return {"shards_total": len(shards), "shards_computed": 0, "images_computed": 0, "seconds": 0.0,
            "num_workers": num_workers, "restarts": 0}


class _Starting:
    """Actors that were asked for and have not answered `ready()` yet."""

    def __init__(self, actors: list, inputs: tuple):
        self.refs = {a.ready.remote(inputs): a for a in actors}
        self.pids: set[int] = set()

    def take(self, timeout: float, want: int = 1) -> list:
        """The actors that answered within `timeout` (at least `want` of them if they answer); an actor
        that died `MAX_TRIES` times while starting is left out with a warning."""
        if not self.refs:
            return []
        ready, _ = ray.wait(list(self.refs), num_returns=min(want, len(self.refs)), timeout=timeout)
        started = []
        for ref in ready:
            actor = self.refs.pop(ref)
            try:
                self.pids.add(ray.get(ref))
                started.append(actor)
            except RayActorError as e:
                log.warning("recover: a worker failed to start %d times (%s); going on without it", MAX_TRIES,
                            worker_error(e))
        return started


def _first_workers(starting: _Starting, n: int, use_gpu: bool, threads: int) -> list:
    """Wait (at most STARTUP_TIMEOUT, a log line per POLL seconds) for the workers the cluster has room for
    now, at least one; the others join the pool when the cluster places them."""
    room, free = placeable_now(use_gpu, threads)
    want = max(1, min(room, n))
    if room < n:
        log.warning("recover: the Ray cluster has room for %d of %d workers now (%s); the others join when it "
                    "places them", room, n, free)
    t0, started = time.perf_counter(), []
    while starting.refs and len(started) < want:
        waited = time.perf_counter() - t0
        if waited >= STARTUP_TIMEOUT:
            break
        got = starting.take(min(POLL, STARTUP_TIMEOUT - waited), want - len(started))
        started += got
        if not got:
            log.info("recover: %d of %d workers started after %.0fs; waiting for the cluster (%s)", len(started), n,
                     time.perf_counter() - t0, free_resources())
    if not started:
        raise EngineError(f"no synthesis worker could start within {time.perf_counter() - t0:.0f}s; the Ray cluster "
                          f"reports {free_resources()}; finished shards are kept, rerun to resume")
    return started


def run_ray(ckpt, shards: list[Shard], store: ShardStore, cfg: RecoverConfig, image_size: int, run_seed: int, *,
            num_workers: int, use_gpu: bool, threads: int = 1, train: ImageSet | None = None,
            class_stats=None) -> dict:
    """Compute every shard the store lacks on `num_workers` Ray actors; write each as it arrives.

    A worker count the cluster can never place is refused (ConfigError);
    workers it cannot place now are waited for at most STARTUP_TIMEOUT
    seconds, then the run goes on with those that started.
    """
    done = store.done()
    todo = [s for s in shards if s.id not in done]
    if not todo:
        return _finished(shards, num_workers)
    n = min(num_workers, len(todo))
    placement(n, use_gpu, threads, "num_gpus" if use_gpu else "num_workers")
    # The backbone (and the real images for `init real`, the per-class statistics) go to the object store once.
    inputs = (ray.put(ckpt), ray.put(train) if train is not None else None,
              ray.put(class_stats) if class_stats is not None else None)
    actor = ray.remote(SynthesisWorker).options(num_cpus=threads, num_gpus=1 if use_gpu else 0, max_restarts=-1,
                                                max_task_retries=MAX_TRIES - 1)
    actors = [actor.remote(cfg, image_size, run_seed, threads, use_gpu) for _ in range(n)]
    t_start = time.perf_counter()
    try:  # start-up (process, imports, model build) reported apart from synthesis
        starting = _Starting(actors, inputs)
        pool = ActorPool(_first_workers(starting, n, use_gpu, threads))
        startup = time.perf_counter() - t_start
        log.info("recover: %d workers ready in %.1fs", n - len(starting.refs), startup)
        t0 = time.perf_counter()
        with Progress(sum(len(s) for s in todo), f"recover ({n} workers)", "img") as bar:
            computed, images, pids = _drain(pool, starting, todo, store, bar, inputs)
    finally:
        _kill(actors)
    return {"shards_total": len(shards), "shards_computed": computed, "images_computed": images,
            "seconds": time.perf_counter() - t_start, "startup_seconds": startup,
            "synthesis_seconds": time.perf_counter() - t0, "num_workers": n,
            "restarts": len(pids | starting.pids) - len(starting.pids)}


def _drain(pool: ActorPool, starting: _Starting, todo: list[Shard], store: ShardStore, bar,
           inputs: tuple) -> tuple[int, int, set]:
    """Hand every shard to the pool and write the results as they come; returns (shards, images, worker pids)."""
    for shard in todo:
        pool.submit(lambda a, s: a.run.remote(s, inputs), shard)
    computed = images = 0
    pids: set[int] = set()
    while pool.has_next():
        for late in starting.take(0, len(starting.refs)):  # workers the cluster placed since
            pool.push(late)
        try:
            sid, imgs, cls, ipc, stats = pool.get_next_unordered(timeout=POLL)
        except (TimeoutError, GetTimeoutError):
            log.info("recover: waiting for shards (%s)", free_resources())
            continue
        except RayTaskError as e:
            if isinstance(getattr(e, "cause", None), Diverged):
                raise Diverged(e.cause.message) from None
            raise EngineError(f"{worker_error(e)} ({MAX_TRIES} attempts); finished shards are kept, rerun to "
                              "resume") from None
        except RayActorError as e:
            raise EngineError(f"a synthesis worker died {MAX_TRIES} times on one shard ({worker_error(e)}); "
                              "finished shards are kept, rerun to resume") from None
        pids.add(stats.pop("pid"))
        store.write_shard(sid, cls, ipc, imgs, extra=stats)
        computed += 1
        images += len(cls)
        bar.update(len(cls), ce=f"{stats['loss_ce']:.3f}")
    if computed < len(todo):  # every worker is gone for good (each death above stops the run first)
        raise EngineError(f"{len(todo) - computed} shards were left without a worker; finished shards are kept, "
                          "rerun to resume")
    return computed, images, pids


def _kill(actors: list, timeout: float = 10.0) -> None:
    """Kill every actor and wait (boundedly) until they are gone: ray.kill returns at once, and a run
    started right after (bench scaling) would find their CPUs still taken."""
    for a in actors:
        ray.kill(a, no_restart=True)
    # answered (with an error) once each is gone; not retried, as calls to a live worker are
    ray.wait([a.ready.options(max_task_retries=0).remote((None, None)) for a in actors], num_returns=len(actors),
             timeout=timeout)
