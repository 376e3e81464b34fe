"""Ray engine: disjoint shards, a killed actor, interrupt + resume, same images as in process."""
import dataclasses
import os
import sys

import pytest
import torch

from scdd_ray.config import RecoverConfig
from scdd_ray.core.shards import plan_shards, recover_shard, run_local
from scdd_ray.dist.synthesis import SynthesisWorker, run_ray
from scdd_ray.errors import EngineError
from scdd_ray.models import create_model, frozen, save_checkpoint, load_checkpoint
from scdd_ray.store import ShardStore

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
    """Dies (os._exit, as an OOM kill or a lost node would) at iteration 2 of its first attempt at `victim`."""

    victim = ""

    def run(self, shard, attempt):
        if shard.id == self.victim and attempt == 0:
            def die(it):
                if it == 2:
                    os._exit(1)

            recover_shard(self.model, shard, self.cfg, self.mean, self.std, self.image_size, self.run_seed,
                          self.device, on_step=die)
        return SynthesisWorker.run(self, shard, attempt)  # no super(): its __class__ cell does not pickle by value


def test_killed_actor_is_replaced_and_output_is_complete_and_identical(ray_session, ckpt, reference, tmp_path):
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path
    store = ShardStore(str(tmp_path))
    store.open("fp")
    shards = plan_shards(4, 3, 2)
    victim = type("DiesOnceAt", (DiesOnce,), {"victim": shards[2].id})
    stats = run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False, worker_cls=victim)
    assert stats["restarts"] == 1 and stats["shards_computed"] == len(shards)
    pairs = _pairs(store)
    assert pairs == [(c, i) for c in range(4) for i in range(3)]  # every pair exactly once
    images, cls, ipc = store.read()
    assert torch.equal(images, reference[0])  # the same images as the uninterrupted run


def test_interrupted_run_resumes_with_only_missing_shards(ray_session, ckpt, reference, tmp_path):
    store = ShardStore(str(tmp_path))
    store.open("fp")
    shards = plan_shards(4, 3, 2)
    finished = []

    def interrupt(sid):
        finished.append(sid)
        if len(finished) == 2:
            raise KeyboardInterrupt  # what Ctrl-C in the driver does

    with pytest.raises(KeyboardInterrupt):
        run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=1, use_gpu=False, on_result=interrupt)
    assert store.done() == set(finished)
    stats = run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False)
    assert stats["shards_computed"] == len(shards) - 2
    assert torch.equal(store.read()[0], reference[0])
    again = run_ray(ckpt, shards, store, CFG, SIZE, 5, num_workers=2, use_gpu=False)
    assert again["shards_computed"] == 0


def test_a_shard_failing_every_time_stops_the_run_naming_it(ray_session, ckpt, tmp_path):
    store = ShardStore(str(tmp_path))
    store.open("fp")
    shards = plan_shards(4, 1, 2)
    bad = dataclasses.replace(CFG, bn_weights="1,2,3")  # wrong length: fails inside the worker every time
    with pytest.raises(EngineError, match=f"shard {shards[0].id}|shard {shards[1].id}") as e:
        run_ray(ckpt, shards, store, bad, SIZE, 5, num_workers=1, use_gpu=False, max_tries=2)
    # the worker's own error, not just its type: actor logs do not reach the driver
    assert "ValueError: `recover.bn_weights` lists 3 weights but the model has" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_bench_scaling_reports_throughput_and_efficiency(ray_session, tmp_path):
    import json

    from scdd_ray.cli import main

    out = tmp_path / "scaling.json"
    assert main(["-q", "bench", "scaling", "--workers", "1,2", "--width", "0.0625", "--image-size", "8",
                 "--num-classes", "2", "--shards", "2", "--iterations", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["workers"] for r in res["results"]] == [1, 2]
    assert all(r["img_iters_per_s"] > 0 for r in res["results"])
    assert res["results"][0]["parallel_efficiency"] == 1.0


def test_bench_recover_writes_throughput(tmp_path, capsys):
    import json

    from scdd_ray.cli import main

    out = tmp_path / "r.json"
    assert main(["-q", "bench", "recover", "--width", "0.125", "--image-size", "16", "--num-classes", "4",
                 "--batch", "8", "--iterations", "3", "--threads", "1", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "recover" and res["img_iters_per_s"] > 0 and res["batch"] == 8
    assert main(["bench", "recover", "--batch", "0", "--json", str(out)]) == 2
    assert "--batch" in capsys.readouterr().err
