import dataclasses

import pytest
import torch

from scdd_ray.config import RecoverConfig
from scdd_ray.core.augment import random_roll
from scdd_ray.core.recover import synthesize
from scdd_ray.core.shards import plan_shards, recover_shard, shard_seed
from scdd_ray.models.factory import create_model
from scdd_ray.models.runtime import frozen

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
CFG = RecoverConfig(iterations=6, lr=0.1, bn_coef=0.1, bn_weights="first:10", jitter=2, crop_scale=(0.5, 1.0),
                    flip=True, classes_per_batch=4)


def test_backbone_is_unchanged_and_gets_no_gradient(tiny_model):
    model = frozen(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = synthesize(model, torch.arange(4), CFG, MEAN, STD, 16, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert res.images.shape == (4, 3, 16, 16) and res.images.dtype == torch.uint8


def test_same_seed_same_images_and_different_seed_differs(tiny_model):
    model = frozen(tiny_model)
    a = synthesize(model, torch.arange(4), CFG, MEAN, STD, 16, seed=7).images
    b = synthesize(model, torch.arange(4), CFG, MEAN, STD, 16, seed=7).images
    c = synthesize(model, torch.arange(4), CFG, MEAN, STD, 16, seed=8).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_optimisation_lowers_the_objective(tiny_model):
    model = frozen(tiny_model)
    cfg = dataclasses.replace(CFG, iterations=40, crop_scale=None, flip=False, jitter=0, lr=0.2)
    res = synthesize(model, torch.arange(4), cfg, MEAN, STD, 16, seed=0, log_every=1)
    first = res.history[0][1] + cfg.bn_coef * res.history[0][2]
    last = res.history[-1][1] + cfg.bn_coef * res.history[-1][2]
    assert last < 0.85 * first


def test_pixels_stay_in_valid_range_and_grayscale_gives_equal_channels(tiny_model):
    model = frozen(tiny_model)
    cfg = dataclasses.replace(CFG, lr=5.0, grayscale=True)  # huge steps would leave the range without clipping
    res = synthesize(model, torch.arange(4), cfg, (0.3,) * 3, (0.3,) * 3, 16, seed=0)
    img = res.images
    assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 1], img[:, 2])
    assert img.min() == 0 and img.max() == 255  # clipped at both ends, not wrapped


def test_shards_cover_every_pair_once_with_content_seeds():
    shards = plan_shards(num_classes=10, ipc=3, classes_per_batch=4)
    pairs = [(c, s.ipc_index) for s in shards for c in s.classes]
    assert len(pairs) == 30 and len(set(pairs)) == 30
    assert len({s.id for s in shards}) == len(shards)
    assert shard_seed(0, shards[0]) == shard_seed(0, plan_shards(10, 3, 4)[0])
    assert shard_seed(0, shards[0]) != shard_seed(1, shards[0])
    assert shard_seed(0, shards[0]) != shard_seed(0, shards[1])


def test_recover_shard_init_real_starts_from_training_images(tiny_model):
    from scdd_ray.data import load_split

    train = load_split("synthetic", "train", image_size=16)
    shard = plan_shards(4, 1, 4)[0]
    cfg = dataclasses.replace(CFG, iterations=1, lr=1e-6, init="real", crop_scale=None, flip=False, jitter=0)
    res, cls, ipc = recover_shard(frozen(tiny_model), shard, cfg, train.info.mean, train.info.std, 16, 0, train=train)
    assert cls == [0, 1, 2, 3] and ipc == [0, 0, 0, 0]
    # with a negligible step the result is (within rounding) a real image of the right class
    for k, c in enumerate(cls):
        members = train.load(train.indices_of_class(c)).int()
        diff = (members - res.images[k].int()).abs().amax(dim=(1, 2, 3))
        assert diff.min() <= 1



def test_shards_can_hold_several_ipc_indices_and_keep_their_old_ids():
    one = plan_shards(10, 5, 10)
    assert [s.id for s in one][:2] == ["ipc0000-c00000-00009", "ipc0001-c00000-00009"]  # ids (and seeds) as before
    many = plan_shards(10, 5, 10, ipc_per_shard=3)
    assert [s.id for s in many] == ["ipc0000-0002-c00000-00009", "ipc0003-0004-c00000-00009"]
    pairs = [p for s in many for p in zip(*s.rows())]
    assert sorted(pairs) == [(c, j) for c in range(10) for j in range(5)] and len(pairs) == len(set(pairs))
    assert [len(s) for s in many] == [30, 20]


def test_a_shard_of_two_ipc_indices_recovers_one_image_per_row(tiny_model):
    from scdd_ray.core.shards import Shard

    cfg = dataclasses.replace(CFG, iterations=2)
    res, cls, ipc = recover_shard(frozen(tiny_model), Shard(2, (0, 1, 3), ipc_count=2), cfg, MEAN, STD, 16, 0)
    assert cls == [0, 1, 3, 0, 1, 3] and ipc == [2, 2, 2, 3, 3, 3] and res.images.shape[0] == 6


def test_per_batch_augmentation_crops_and_flips_every_image_alike():
    from scdd_ray.core.augment import random_flip, random_resized_crop

    x = torch.rand(1, 3, 16, 16).expand(6, 3, 16, 16).contiguous()
    same = random_resized_crop(x, 16, (0.2, 0.5), torch.Generator().manual_seed(0), per_batch=True)
    assert all(torch.equal(same[0], same[i]) for i in range(6))
    each = random_resized_crop(x, 16, (0.2, 0.5), torch.Generator().manual_seed(0))
    assert not all(torch.equal(each[0], each[i]) for i in range(6))
    flips = [random_flip(x, torch.Generator().manual_seed(s), per_batch=True) for s in range(8)]
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(3)) for f in flips)
    assert any(torch.equal(f, x.flip(3)) for f in flips) and any(torch.equal(f, x) for f in flips)


def test_new_recover_settings_at_their_defaults_keep_earlier_fingerprints():
    from scdd_ray.config import build_distill_config

    # the fingerprint the digits main job had before augment_per, ipc_per_shard and the data options existed
    assert build_distill_config("digits", "out", {}).fingerprint() == "5c4bc6e9fe4607f8"
    assert build_distill_config("digits", "out", {"recover.ipc_per_shard": 2}).fingerprint() != "5c4bc6e9fe4607f8"


def test_compiled_objective_is_captured_once_and_gives_the_eager_images(tiny_model, monkeypatch):
    """`recover.compile`: one graph, no break, reused by every shard of the model; same images as eager
    (captured with a counting backend that runs the graph as is: code generation is torch's part)."""
    graphs, backends = [], []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = torch.compile

    def compile_counting(fn, backend):  # the configured backend reaches torch.compile; the test counts graphs
        backends.append(backend)
        return real(fn, backend=counting)

    monkeypatch.setattr(torch, "compile", compile_counting)
    cfg = RecoverConfig(iterations=4, lr=0.1, bn_coef=0.1, jitter=2, crop_scale=(0.5, 1.0), flip=True,
                        compile_backend="eager")
    model = frozen(tiny_model)
    eager = [synthesize(model, torch.tensor(t), cfg, MEAN, STD, 16, seed=s).images for t, s in (([0, 1], 1), ([2, 3], 2))]
    twin = frozen(create_model("resnet18", 4, width=0.125))
    twin.load_state_dict(model.state_dict())
    compiled = dataclasses.replace(cfg, compile=True)
    for (t, s), want in zip((([0, 1], 1), ([2, 3], 2)), eager):
        got = synthesize(twin, torch.tensor(t), compiled, MEAN, STD, 16, seed=s).images
        assert torch.equal(got, want)
    assert len(graphs) == 1 and backends == ["eager"]  # two shards, one capture, no graph break


# --- one layout, one shape, one compile (GPU-path defects held on the CPU) ----------------------------

RCFG = RecoverConfig(iterations=4, lr=0.1, bn_coef=0.1, jitter=4, crop_scale=None, flip=True)


def test_roll_keeps_channels_last_for_every_shift():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for seed in range(60):  # every (dx, dy) in [0, 4]^2 comes up, zeros included
        y = random_roll(x, 4, torch.Generator().manual_seed(seed))
        assert y.is_contiguous(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(seed)
        dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
        assert torch.equal(y, torch.roll(x.contiguous(), shifts=(dx, dy), dims=(2, 3)))


@pytest.mark.parametrize("crop", [None, (0.5, 1.0)])
def test_recover_feeds_one_layout_and_one_shape_every_iteration_and_shard(crop):
    """Whatever layout the caller's model has and whatever the augmentation draws, every iteration of a
    shard feeds the model one shape in channels_last, weights channels_last too."""
    torch.manual_seed(0)
    model = frozen(create_model("resnet18", 10, width=0.125))  # built NCHW, as a careless caller would
    seen = []
    conv = model.conv1
    conv.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape, a[0].stride(),
                                                             m.weight.is_contiguous(memory_format=torch.channels_last))))
    cfg = dataclasses.replace(RCFG, iterations=12, crop_scale=crop, classes_per_batch=4)
    shards = plan_shards(10, 1, cfg.classes_per_batch)
    assert [len(s) for s in shards] == [4, 4, 2]  # a short last shard
    for shard in shards:
        seen.clear()
        recover_shard(model, shard, cfg, MEAN, STD, 16, run_seed=0)
        shapes, strides, weights_cl = zip(*seen)
        assert len(set(shapes)) == 1 and len(set(strides)) == 1 and all(weights_cl), (set(shapes), set(strides))
        x = torch.empty(shapes[0]).contiguous(memory_format=torch.channels_last)
        assert strides[0] == x.stride()


def test_compiled_step_compiles_once_per_model_for_a_run_with_a_short_last_shard(monkeypatch):
    """Shards of 4, 4 and 2 images: one graph (the batch dimension is dynamic from the start), no recompile
    for the layout either; the images equal the eager step's."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, backend: real(fn, backend=counting))
    torch._dynamo.reset()
    cfg = dataclasses.replace(RCFG, iterations=6, crop_scale=(0.5, 1.0), classes_per_batch=4,
                              compile_backend="eager")
    torch.manual_seed(0)
    eager_model = frozen(create_model("resnet18", 10, width=0.125))
    compiled_model = frozen(create_model("resnet18", 10, width=0.125))
    compiled_model.load_state_dict(eager_model.state_dict())
    shards = plan_shards(10, 1, cfg.classes_per_batch)
    for shard in shards:
        want = recover_shard(eager_model, shard, cfg, MEAN, STD, 16, run_seed=0)[0].images
        got = recover_shard(compiled_model, shard, dataclasses.replace(cfg, compile=True), MEAN, STD, 16,
                            run_seed=0)[0].images
        assert (got.int() - want.int()).abs().max() <= 1  # the dynamic graph's float sums may round apart
    assert len(graphs) == 1, [g.graph for g in graphs]
