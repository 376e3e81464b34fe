"""The GPU code paths, held on the CPU: no host sync in the recover and post-train steps (on the meta device,
tests/host_syncs.py), soft labels kept on the device until an epoch ends, encoded sets decoded ahead, the
bf16 recover objective, channels_last squeeze views, a multi-tensor MoCo update. (One layout, one shape and one
compile per recover run: tests/test_recover.py; BN matching memory: tests/test_bn.py.)"""
import dataclasses
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from host_syncs import HostSyncs

from scdd_ray.config import PosttrainConfig, RecoverConfig, SqueezeConfig
from scdd_ray.core import posttrain as core_posttrain
from scdd_ray.core.bn import BNMatch, bn_layers
from scdd_ray.core.posttrain import PostTrainer, epoch_batches, run_epoch, train_step
from scdd_ray.core.recover import Recovery, recover_objective
from scdd_ray.core.shards import plan_shards, recover_shard
from scdd_ray.core.soft_labels import SoftLabelRecorder, soft_label_rows
from scdd_ray.core.ssl import NTXentLoss, ema, mlp
from scdd_ray.core.squeeze import ssl_view, supervised_view
from scdd_ray.data import load_split
from scdd_ray.models.factory import create_model
from scdd_ray.models.runtime import frozen
from scdd_ray.store.encoded import EncodedImages
from scdd_ray.store.shards import ShardStore
from scdd_ray.store.distilled import read_encoded

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
RCFG = RecoverConfig(iterations=4, lr=0.1, bn_coef=0.1, jitter=4, crop_scale=None, flip=True)
PCFG = PosttrainConfig(student="resnet18", student_width=0.125, epochs=1, batch_size=5, lr=2e-3, temperature=4.0,
                       mix="cutmix", mix_prob=1.0, crop_scale=(0.5, 1.0), flip=True)


# --- host syncs -------------------------------------------------------------------------------------------

def _meta(model):
    return model.to("meta", memory_format=torch.channels_last)


def test_the_recover_step_never_waits_for_the_device():
    torch.manual_seed(0)
    model = frozen(_meta(create_model("resnet18", 4, width=0.125)))
    for cfg in (RCFG, dataclasses.replace(RCFG, crop_scale=(0.5, 1.0), flip=True, augment_per="batch"),
                dataclasses.replace(RCFG, grayscale=True, bn_normalize="channel")):
        rec = Recovery(model, torch.arange(4), cfg, MEAN, STD, 16, seed=0, device="meta")
        with rec.hooks, HostSyncs():
            for it in range(cfg.iterations):
                rec.step(it)
        assert len(rec.history) >= 1


@pytest.mark.parametrize("labels", ["soft", "hard", "stored"])
def test_the_posttrain_step_never_waits_for_the_device(labels):
    info = load_split("synthetic", "test", None, 16).info
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), generator=g, dtype=torch.uint8).to("meta")
    cfg = dataclasses.replace(PCFG, labels="hard" if labels == "hard" else "soft")
    torch.manual_seed(0)
    teacher = None if labels == "hard" else frozen(_meta(create_model("resnet18", info.num_classes, width=0.125)))
    tr = PostTrainer(cfg, images, teacher, info, image_size=16, small_input=True, seed=0,
                     labels=torch.arange(12) % info.num_classes)
    recorder = SoftLabelRecorder(cfg.temperature, k=3)
    batches = epoch_batches(12, cfg, 16, seed=0, epoch=0)
    with HostSyncs():
        for s, sb in enumerate(batches * 2):  # the first step fills the per-device caches; both are checked
            _, target = train_step(tr.student, teacher, tr.opt, images, sb, tr.rows, tr.weight, cfg, 16, info.mean,
                                   info.std, labels=tr.labels)
            if labels == "stored":
                recorder.record(0, s, sb, tr.rows, target)


def test_soft_labels_recorded_on_the_device_are_the_columns_read_step_by_step():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    teacher = frozen(create_model("resnet18", 4, width=0.125))
    student = create_model("resnet18", 4, width=0.125)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    batches = epoch_batches(12, PCFG, 16, seed=0, epoch=0)
    rows = torch.arange(5)
    recorder, each = SoftLabelRecorder(PCFG.temperature, k=3), []

    def on_step(s, sb, target):
        recorder.record(0, s, sb, rows, target)
        each.append(soft_label_rows(0, s, sb, rows, target, PCFG.temperature, 3))

    run_epoch(student, teacher, opt, images, batches, rows, 1.0, PCFG, 16, MEAN, STD, step=0, total_steps=2,
              on_step=on_step)
    cols = recorder.columns()
    for c, v in cols.items():
        assert (v == __import__("numpy").concatenate([r[c] for r in each])).all(), c


def test_nt_xent_builds_its_targets_on_the_device():
    z1, z2 = torch.randn(6, 8, device="meta", requires_grad=True), torch.randn(6, 8, device="meta")
    with HostSyncs():
        NTXentLoss(0.5)(z1, z2).backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_in_memory_batches_for_a_gpu_are_pinned():
    from scdd_ray.data import iterate

    train = load_split("synthetic", "train", None, 16)
    x, y = next(iter(iterate(train, 8, device="cuda")))
    assert x.is_pinned() and y.is_pinned()


# --- encoded sets ------------------------------------------------------------------------------------------

def _encoded(tmp_path, n=12):
    store = ShardStore(str(tmp_path))
    store.open("fp")
    g = torch.Generator().manual_seed(0)
    store.write_shard("a", [i % 4 for i in range(n)], [i // 4 for i in range(n)],
                      torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8))
    return read_encoded(str(tmp_path))


def test_an_encoded_set_on_an_accelerator_decodes_the_next_step_while_this_one_trains(tmp_path, monkeypatch):
    """Each step waits (in this test) until the next step's images are being decoded: it would wait forever,
    and fail, if decoding did not run in the background while the step trains."""
    encoded = _encoded(tmp_path).to("meta")
    cfg = dataclasses.replace(PCFG, batch_size=3)
    batches = epoch_batches(len(encoded), cfg, 16, seed=0, epoch=0)
    started = {tuple(sb.idx.tolist()): threading.Event() for sb in batches}
    threads, trained = set(), []
    real_gather = EncodedImages.gather

    def gather(self, idx, need):
        threads.add(threading.current_thread().name)
        started[tuple(idx.tolist())].set()
        return real_gather(self, idx, need)

    def step(student, teacher, opt, images, sb, *args):
        s = len(trained)
        if s + 1 < len(batches):
            assert started[tuple(batches[s + 1].idx.tolist())].wait(timeout=30), f"step {s + 1} not decoded ahead"
        trained.append(args[-1].shape)  # the step's images, decoded ahead
        return torch.zeros((), device="meta"), None

    monkeypatch.setattr(EncodedImages, "gather", gather)
    monkeypatch.setattr(core_posttrain, "train_step", step)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    run_epoch(None, None, opt, encoded, batches, torch.arange(3), 1.0, cfg, 16, MEAN, STD, step=0, total_steps=4)
    assert len(trained) == len(batches) >= 3 and all(shape == (3, 3, 16, 16) for shape in trained)
    assert threads and all(t.startswith("decode") for t in threads)  # never in the training thread


def test_decoding_ahead_trains_exactly_as_decoding_on_demand(tmp_path, monkeypatch):
    encoded = _encoded(tmp_path)
    info = load_split("synthetic", "test", None, 16).info
    teacher = frozen(create_model("resnet18", info.num_classes, width=0.125))
    runs = []
    for ahead in (False, True):
        monkeypatch.setattr(core_posttrain, "prefetches", lambda images, ahead=ahead: ahead)
        tr = PostTrainer(dataclasses.replace(PCFG, epochs=2), encoded, teacher, info, image_size=16,
                         small_input=True, seed=0)
        tr.fit()
        runs.append(tr.student.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# --- the dtype path a GPU takes, on the CPU (BN matching memory: tests/test_bn.py) ----------------------

def test_recover_objective_under_bf16_autocast_matches_float32():
    """The dtype path a GPU takes, run on the CPU: bf16 forward, float32 BN statistics and loss."""
    torch.manual_seed(0)
    model = frozen(create_model("resnet18", 4, width=0.25)).to(memory_format=torch.channels_last)
    for m in bn_layers(model):
        m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = {}
    with BNMatch(model) as bnm:
        for dtype in (None, torch.bfloat16):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                ce, bn = recover_objective(model, bnm, "cpu", xi, torch.arange(4), amp="none")
            assert ce.dtype == bn.dtype == torch.float32
            (ce + 0.1 * bn).backward()
            assert xi.grad.is_contiguous(memory_format=torch.channels_last)
            out[dtype] = (float((ce + 0.1 * bn).detach()), xi.grad.flatten())
    (l32, g32), (l16, g16) = out[None], out[torch.bfloat16]
    assert abs(l16 - l32) / abs(l32) < 2e-2 and F.cosine_similarity(g16, g32, dim=0) > 0.99


def _as_on_a_gpu(monkeypatch):
    """What a GPU runs, on the CPU: bf16 autocast wherever the code asks for it (ours is a no-op on CPU) and
    channels_last students and teachers (CPU post-training uses NCHW)."""
    from scdd_ray.core import recover as core_recover

    def bf16(device, amp="bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp != "none")
    monkeypatch.setattr(core_recover, "autocast", bf16)
    monkeypatch.setattr(core_posttrain, "autocast", bf16)
    monkeypatch.setattr(core_posttrain, "memory_format", lambda device: torch.channels_last)


def test_recover_run_in_bf16_and_channels_last_on_the_cpu_stays_close_to_float32(monkeypatch):
    """Whole recover runs (flip, crop, jitter; eager and compiled) the way a GPU runs them: the images end
    within a few grey levels of the float32 run's, the losses close."""
    torch.manual_seed(0)
    model = frozen(create_model("resnet18", 4, width=0.25))
    cfg = dataclasses.replace(RCFG, iterations=8, crop_scale=(0.5, 1.0), bn_coef=0.01, classes_per_batch=4)
    shard = plan_shards(4, 1, 4)[0]
    want = recover_shard(model, shard, cfg, MEAN, STD, 16, run_seed=0)[0]
    _as_on_a_gpu(monkeypatch)
    torch._dynamo.reset()
    for c in (cfg, dataclasses.replace(cfg, compile=True, compile_backend="eager")):
        got = recover_shard(model, shard, c, MEAN, STD, 16, run_seed=0)[0]
        assert got.images.dtype == torch.uint8 and got.images.shape == want.images.shape
        diff = (got.images.float() - want.images.float()).abs().mean()
        assert 0 < diff < 3, diff  # bf16 did run (not bit-identical), and stayed close
        assert got.loss_ce == pytest.approx(want.loss_ce, rel=0.05)
        assert got.loss_bn == pytest.approx(want.loss_bn, rel=0.05)


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_posttrain_in_bf16_and_channels_last_on_the_cpu_stays_close_to_float32(monkeypatch, labels):
    info = load_split("synthetic", "test", None, 16).info
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), generator=g, dtype=torch.uint8)
    cfg = dataclasses.replace(PCFG, student_width=0.25, epochs=2, labels=labels)
    runs = []
    for gpu_like in (False, True):
        if gpu_like:
            _as_on_a_gpu(monkeypatch)
        torch.manual_seed(0)
        teacher = frozen(create_model("resnet18", info.num_classes, width=0.25))
        losses = []
        tr = PostTrainer(cfg, images, None if labels == "hard" else teacher, info, image_size=16, small_input=True,
                         seed=0, labels=torch.arange(12) % info.num_classes)
        tr.fit(on_epoch=lambda e, running, n: losses.append(float(running) / n))
        conv = tr.student.conv1.weight
        assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last) == gpu_like
        assert all(torch.isfinite(p).all() for p in tr.student.parameters())
        runs.append(losses)
    (l32, l16) = runs
    assert l16 != l32 and l16 == pytest.approx(l32, rel=0.05), (l32, l16)


# --- squeeze ---------------------------------------------------------------------------------------------

def test_squeeze_views_reach_the_model_in_its_channels_last_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    for view in (ssl_view, supervised_view):
        v = view(x, 16, SqueezeConfig(), MEAN, STD, g)
        assert v.is_contiguous(memory_format=torch.channels_last) and v.shape == (4, 3, 16, 16)


def test_moco_momentum_update_is_a_few_multi_tensor_kernels_and_the_ema():
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model, proj = create_model("resnet18", 4, width=0.125), mlp(64, 64, 16)
    m_model, m_proj = create_model("resnet18", 4, width=0.125), mlp(64, 64, 16)
    want_p = [m.detach().clone() for m in list(m_model.parameters()) + list(m_proj.parameters())]
    src_p = [p.detach() for p in list(model.parameters()) + list(proj.parameters())]

    class Count(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Count(), torch.no_grad():  # as MoCoV3.loss calls it
        ema(m_model, model, m_proj, proj, step=3, total=10)
    assert len(want_p) > 60 and len(Count.ops) <= 6, Count.ops
    m = 1 - 0.01 * 0.5 * (1 + math.cos(math.pi * 3 / 10))
    for got, old, src in zip(list(m_model.parameters()) + list(m_proj.parameters()), want_p, src_p):
        torch.testing.assert_close(got, old * m + src * (1 - m))
    for got, src in zip(list(m_model.buffers()) + list(m_proj.buffers()), list(model.buffers()) + list(proj.buffers())):
        assert torch.equal(got, src)
