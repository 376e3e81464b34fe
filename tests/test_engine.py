"""Ray engine: disjoint shards, a killed actor, interrupt + resume, same images as in process; workers the
cluster cannot place; chaos (kill -9 of random actors, SIGTERM, resume)."""
import dataclasses
import os
import random
import signal
import sys
import time

import pytest
import torch

from scdd_ray.config import RecoverConfig
from scdd_ray.core.shards import plan_shards, recover_shard, run_local
from scdd_ray.dist import synthesis
from scdd_ray.dist.cluster import handle_sigterm, reset_sigterm
from scdd_ray.dist.synthesis import SynthesisWorker, run_ray
from scdd_ray.errors import EngineError
from scdd_ray.models.checkpoint import load_checkpoint, save_checkpoint
from scdd_ray.models.factory import create_model
from scdd_ray.models.runtime import frozen
from scdd_ray.store.shards import ShardStore

CFG = RecoverConfig(iterations=4, lr=0.1, bn_coef=0.1, jitter=2, crop_scale=(0.5, 1.0), flip=True,
                    classes_per_batch=2)
SIZE = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = create_model("resnet18", 4, width=0.0625)
    p = tmp_path_factory.mktemp("ck") / "bb.pt"
    save_checkpoint(str(p), m, arch="resnet18", width=0.0625, num_classes=4, image_size=SIZE, small_input=True,
                    mean=(0.5,) * 3, std=(0.25,) * 3, method="simclr")
    return load_checkpoint(str(p))


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """An uninterrupted in-process run: the images every other run must reproduce."""
    store = ShardStore(str(tmp_path_factory.mktemp("ref")))
    store.open("fp")
    shards = plan_shards(4, 3, 2)
    model = frozen(ckpt.build().to(memory_format=torch.channels_last))
    run_local(model, shards, store, CFG, ckpt.mean, ckpt.std, SIZE, run_seed=5)
    return store.read()


def _pairs(store):
    _, cls, ipc = store.read()
    return sorted(zip(cls.tolist(), ipc.tolist()))


class DiesOnce(SynthesisWorker):
    """Dies (os._exit, as an OOM kill or a lost node would) at iteration 2 of its first attempt at `victim`;
    `marker` (a file) remembers the attempt across the restart."""

    victim = marker = ""

    def run(self, shard, inputs):
        self.load(inputs)
        if shard.id == self.victim and not os.path.exists(self.marker):
            open(self.marker, "w").close()

            def die(it):
                if it == 2:
                    os._exit(1)

            recover_shard(self.model, shard, self.cfg, self.mean, self.std, self.image_size, self.run_seed,
                          self.device, on_step=die)
        return SynthesisWorker.run(self, shard, inputs)  # no super(): its __class__ cell does not pickle by value


class Hooked(ShardStore):
    """A store that calls `hook(shard_id)` after each shard it writes (what Ctrl-C or a kill is timed by)."""

    def __init__(self, root, hook):
        super().__init__(root)
        self.hook = hook

    def write_shard(self, shard_id, *args, **kwargs):
        written = super().write_shard(shard_id, *args, **kwargs)
        self.hook(shard_id)
        return written


def test_killed_actor_is_replaced_and_output_is_complete_and_identical(ray_session, ckpt, reference, tmp_path,
                                                                      monkeypatch):
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path
    store = ShardStore(str(tmp_path / "out"))
    store.open("fp")
    shards = plan_shards(4, 3, 2)
    victim = type("DiesOnceAt", (DiesOnce,), {"victim": shards[2].id, "marker": str(tmp_path / "died")})
    monkeypatch.setattr(synthesis, "SynthesisWorker", victim)
    stats = run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False)
    assert stats["restarts"] == 1 and stats["shards_computed"] == len(shards)
    pairs = _pairs(store)
    assert pairs == [(c, i) for c in range(4) for i in range(3)]  # every pair exactly once
    images, cls, ipc = store.read()
    assert torch.equal(images, reference[0])  # the same images as the uninterrupted run


def test_interrupted_run_resumes_with_only_missing_shards(ray_session, ckpt, reference, tmp_path):
    finished = []

    def interrupt(sid):
        finished.append(sid)
        if len(finished) == 2:
            raise KeyboardInterrupt  # what Ctrl-C in the driver does

    store = Hooked(str(tmp_path), interrupt)
    store.open("fp")
    shards = plan_shards(4, 3, 2)
    with pytest.raises(KeyboardInterrupt):
        run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=1, use_gpu=False)
    assert store.done() == set(finished)
    stats = run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False)
    assert stats["shards_computed"] == len(shards) - 2
    assert torch.equal(store.read()[0], reference[0])
    again = run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False)
    assert again["shards_computed"] == 0


def test_a_shard_failing_every_time_stops_the_run_naming_it(ray_session, ckpt, tmp_path, monkeypatch):
    store = ShardStore(str(tmp_path))
    store.open("fp")
    shards = plan_shards(4, 1, 2)
    bad = dataclasses.replace(CFG, bn_weights="1,2,3")  # wrong length: fails inside the worker every time
    monkeypatch.setattr(synthesis, "MAX_TRIES", 2)
    with pytest.raises(EngineError, match=f"shard {shards[0].id}|shard {shards[1].id}") as e:
        run_ray(ckpt, shards, store, bad, SIZE, 5, num_workers=1, use_gpu=False)
    # the worker's own error, not just its type: actor logs do not reach the driver
    assert "ValueError: `recover.bn_weights` lists 3 weights but the model has" in str(e.value)
    assert "(2 attempts)" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_bench_scaling_reports_throughput_and_efficiency(ray_session, tmp_path):
    import json

    from scdd_ray.cli import main

    out = tmp_path / "scaling.json"
    assert main(["-q", "bench", "scaling", "--workers", "1,2", "--width", "0.0625", "--image-size", "8",
                 "--classes-per-batch", "2", "--shards", "2", "--iterations", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["workers"] for r in res["results"]] == [1, 2]
    assert all(r["img_iters_per_s"] > 0 for r in res["results"])
    assert res["results"][0]["parallel_efficiency"] == 1.0


def test_bench_recover_writes_throughput(tmp_path, capsys):
    import json

    from scdd_ray.cli import main

    out = tmp_path / "r.json"
    assert main(["-q", "bench", "recover", "--width", "0.125", "--image-size", "16", "--num-classes", "4",
                 "--batch", "8", "--timed-iterations", "3", "--threads", "1", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "recover" and res["img_iters_per_s"] > 0 and res["batch"] == 8
    # the reference loop timed in turns with ours, and the ratio of the two medians
    assert len(res["reference_seconds"]) == 1 and res["reference_img_iters_per_s"] > 0
    assert res["vs_reference"] == pytest.approx(res["img_iters_per_s"] / res["reference_img_iters_per_s"], rel=1e-2)
    assert main(["bench", "recover", "--batch", "0", "--json", str(out)]) == 2
    assert "--batch" in capsys.readouterr().err


# --- issue 15: a cluster that cannot place workers, and chaos --------------------------------------

def test_workers_the_cluster_cannot_place_are_refused_or_not_waited_for(ray_session, ckpt, tmp_path, caplog,
                                                                        monkeypatch):
    from ray.util.placement_group import placement_group, remove_placement_group

    from scdd_ray.errors import ConfigError

    shards = plan_shards(4, 1, 1)
    store = ShardStore(str(tmp_path / "a"))
    store.open("fp")
    with pytest.raises(ConfigError, match="3 workers need 3 CPUs but the Ray cluster has 2"):
        run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=3, use_gpu=False)
    for _ in range(300):  # the actors of earlier tests are gone: the cluster has both CPUs free again
        if ray_session.available_resources().get("CPU", 0) == 2:
            break
        time.sleep(0.1)
    held = [placement_group([{"CPU": 1}])]  # another job holds one of the session's 2 CPUs
    try:
        ray_session.get(held[0].ready())
        with caplog.at_level("INFO", logger="scdd_ray"):
            stats = run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False)
        assert stats["shards_computed"] == 4 and store.done() == {s.id for s in shards}
        assert "the Ray cluster has room for 1 of 2 workers now (1 of 2 CPUs free" in caplog.text
        held.append(placement_group([{"CPU": 1}]))  # now both: no worker can start
        ray_session.get(held[1].ready(), timeout=60)
        other = ShardStore(str(tmp_path / "b"))
        other.open("fp")
        t0 = time.perf_counter()
        monkeypatch.setattr(synthesis, "STARTUP_TIMEOUT", 2)
        monkeypatch.setattr(synthesis, "POLL", 1)
        with caplog.at_level("INFO", logger="scdd_ray"):
            with pytest.raises(EngineError, match="no synthesis worker could start within 2s; the Ray cluster "
                                                  "reports 0 of 2 CPUs free"):
                run_ray(ckpt, shards, other, CFG, SIZE, 5, num_workers=1, use_gpu=False)
        assert time.perf_counter() - t0 < 30 and other.done() == set()
        assert "0 of 1 workers started after 1s; waiting for the cluster" in caplog.text
    finally:
        for pg in held:
            remove_placement_group(pg)


class PidFile(SynthesisWorker):
    """Writes its pid into `pid_dir` once started, for the test to kill -9 it as a user or the OOM killer would."""

    pid_dir = ""

    def __init__(self, *args):
        SynthesisWorker.__init__(self, *args)  # no super(): its __class__ cell does not pickle by value
        with open(os.path.join(self.pid_dir, str(os.getpid())), "w"):
            pass


def test_chaos_kills_and_sigterm_then_resume_give_every_shard_once_and_the_same_images(ray_session, ckpt, tmp_path,
                                                                                       monkeypatch):
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shards = plan_shards(4, 3, 1)  # 12 shards of one image
    ref = ShardStore(str(tmp_path / "ref"))
    ref.open("fp")
    run_local(frozen(ckpt.build().to(memory_format=torch.channels_last)), shards, ref, CFG, ckpt.mean, ckpt.std, SIZE,
              run_seed=5)
    rng, killed, finished = random.Random(15), [], []

    def worker_cls(run):  # each run's workers write their pids apart: those of the other run are gone
        (tmp_path / run).mkdir()
        return type("Chaos", (PidFile,), {"pid_dir": str(tmp_path / run)})

    def kill_a_random_worker():
        run = tmp_path / ("run2" if (tmp_path / "run2").exists() else "run1")
        victim = rng.choice(sorted(set(os.listdir(run)) - set(killed)))  # a started worker not killed yet
        os.kill(int(victim), signal.SIGKILL)
        killed.append(victim)

    def chaos(sid):
        finished.append(sid)
        if len(finished) == 1:
            kill_a_random_worker()
        if len(finished) == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM, Kubernetes or systemd send the driver

    store = Hooked(str(tmp_path / "out"), chaos)
    store.open("fp")
    monkeypatch.setattr(synthesis, "SynthesisWorker", worker_cls("run1"))
    previous = signal.getsignal(signal.SIGTERM)
    handle_sigterm()  # as the CLI does: SIGTERM is Ctrl-C, not Ray's aborting C++ handler
    try:
        with pytest.raises(KeyboardInterrupt):
            run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
        reset_sigterm()
    assert len(killed) == 1 and store.done() == set(finished)
    finished.clear()

    def kill_once(sid):
        finished.append(sid)
        if len(finished) == 2:
            kill_a_random_worker()

    store.hook = kill_once
    monkeypatch.setattr(synthesis, "SynthesisWorker", worker_cls("run2"))
    stats = run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False)
    # the killed worker had a shard, or gets the next one: its death is seen, and it is replaced, before the end
    assert len(killed) == 2 and stats["restarts"] == 1 and stats["shards_computed"] == 6
    assert _pairs(store) == [(c, i) for c in range(4) for i in range(3)]  # every pair exactly once
    assert store.verify() == [] and len([f for f in os.listdir(store.root) if f.endswith(".parquet")]) == 12
    assert torch.equal(store.read()[0], ref.read()[0])  # the same images as the uninterrupted run
