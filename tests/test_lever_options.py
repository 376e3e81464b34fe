"""The levers of the SRe2L family as options of their stages (issue 24): each one's maths against hand or
NumPy values, and each off by default (fingerprints of earlier runs unchanged)."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from scdd_ray import class_stats
from scdd_ray.backbones import plan_models, resolve_models
from scdd_ray.bench.table import TableSpec, cell_models
from scdd_ray.class_stats import cached_class_statistics
from scdd_ray.config import PosttrainConfig, RecoverConfig, build_config, build_distill_config
from scdd_ray.core.bn import BNMatch, bn_layers, smoothed
from scdd_ray.core.class_bn import ClassBNMatch, class_statistics
from scdd_ray.core.committee import committee_logits
from scdd_ray.core.configs import fingerprint_view
from scdd_ray.core.ema import ema_decay, ema_update
from scdd_ray.core.posttrain import PostTrainer, build_teacher
from scdd_ray.core.augment import normalize, to_float
from scdd_ray.core.posttrain_job import PosttrainJob
from scdd_ray.core.shards import plan_shards, recover_shard
from scdd_ray.core.real_init import candidates, class_ranking, confident_init, stitch
from scdd_ray.core.recover import synthesize
from scdd_ray.data.base import TensorImageSet
from scdd_ray.models.checkpoint import save_checkpoint
from scdd_ray.models.factory import create_model
from scdd_ray.models.runtime import frozen
from scdd_ray.data import load_split
from scdd_ray.errors import ConfigError

SIZE = 16
CFG = PosttrainConfig(student="resnet18", student_width=0.125, epochs=3, batch_size=5, lr=2e-3, temperature=4.0,
                      mix="cutmix", mix_prob=1.0, crop_scale=(0.5, 1.0), flip=True, checkpoint_every=1)


from test_posttrain import _images, _info  # noqa: E402  (the same small synthetic set)


def _hard_trainer(cfg):
    return PostTrainer(cfg, _images(12), None, _info(), image_size=SIZE, small_input=True, seed=0,
                       labels=torch.arange(12) % 4)


# --- post-train: the moving average of the student (EDC) ------------------------------------------------

def test_ema_decay_is_capped_while_few_updates_exist():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(0.999, 90) == pytest.approx(0.91)  # 91 / 100
    assert ema_decay(0.5, 1000) == 0.5  # the decay itself once the cap passes it


def test_ema_update_by_hand():
    avg = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    ema_update(avg, {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}, 0.75)
    torch.testing.assert_close(avg["w"], torch.tensor([1.5, 3.0]))  # 0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6
    assert int(avg["n"]) == 5  # a counter is copied, not averaged


def test_trainer_average_follows_every_step_and_resumes():
    cfg = dataclasses.replace(CFG, labels="hard", ema=0.9)
    plain = _hard_trainer(dataclasses.replace(cfg, ema=0.0))
    snaps = []
    plain.fit(on_step=lambda e, s, sb, t: snaps.append({k: v.clone() for k, v in plain.student.state_dict().items()}))
    ref = {k: v.clone() for k, v in _hard_trainer(cfg).student.state_dict().items()}  # the initial student
    for i, snap in enumerate(snaps):  # the average computed by hand from the student after every step
        d = min(0.9, (1 + i) / (10 + i))
        for k, v in snap.items():
            ref[k] = d * ref[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    tr = _hard_trainer(cfg)
    tr.fit()
    assert len(snaps) == tr.state["step"] > 1
    for k in ref:
        torch.testing.assert_close(tr.average[k], ref[k], rtol=1e-5, atol=1e-6)
    # the student trains exactly as without the average, and the evaluated model is the average
    torch.testing.assert_close(tr.student.state_dict(), plain.student.state_dict())
    evaluated = tr.evaluated().state_dict()
    assert all(torch.equal(evaluated[k], tr.average[k]) for k in ref)
    # stopped after one epoch and resumed from its state: the same average at the end
    first = _hard_trainer(cfg)
    first.cfg = dataclasses.replace(cfg, epochs=1)  # stops after epoch 1 on the 3-epoch schedule
    first.fit()
    resumed = _hard_trainer(cfg)
    resumed.load_state_dict(first.state_dict())
    resumed.fit()
    for k in ref:
        torch.testing.assert_close(resumed.average[k], tr.average[k])


def test_ema_is_validated_and_off_by_default():
    with pytest.raises(ConfigError, match="posttrain.ema"):
        build_distill_config("synthetic", "out", {"posttrain.ema": 1.0})
    cfg = build_distill_config("synthetic", "out", {})
    assert cfg.posttrain.ema == 0.0 and "ema" not in fingerprint_view(cfg.posttrain)
    assert _hard_trainer(dataclasses.replace(CFG, labels="hard")).average is None


# --- relabel: a committee of teachers (CV-DD) ----------------------------------------------------------

def _teacher_file(path, seed):
    torch.manual_seed(seed)
    save_checkpoint(str(path), create_model("resnet18", 4, 0.125), arch="resnet18", width=0.125, num_classes=4,
                    image_size=16, small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3, method="supervised")
    return str(path)


def test_committee_logits_against_numpy():
    rng = np.random.default_rng(0)
    z = [torch.from_numpy(rng.normal(0, 3, (5, 4))).float() for _ in range(3)]
    t = 4.0

    def softmax(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    want = np.mean([softmax(x.numpy() / t) for x in z], axis=0)
    got = torch.softmax(committee_logits(z, "prob", t) / t, dim=1)  # what kd_loss reads at temperature t
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(committee_logits(z, "logit", t).numpy(), np.mean([x.numpy() for x in z], 0),
                               rtol=1e-6, atol=1e-6)
    assert committee_logits(z[:1], "prob", t) is z[0]  # one teacher: its logits as they are


def test_committee_is_planned_resolved_and_built(tmp_path):
    a, b = _teacher_file(tmp_path / "ta.pt", 1), _teacher_file(tmp_path / "tb.pt", 2)
    base = {"dataset": "synthetic", "out": str(tmp_path / "run"), "method": "random", "teacher": f"{a},{b}"}
    plan = plan_models(build_config(base))
    assert [s.path for s in plan.teachers] == [a, b] and all(s.given for s in plan.teachers)
    info = load_split("synthetic", "test", None, SIZE).info
    models = resolve_models(build_config(base), info, torch.device("cpu"))
    assert models.teacher_path == f"{a},{b}" and len(models.teacher) == 2
    cfg = dataclasses.replace(CFG, temperature=3.0, committee="logit")
    committee = build_teacher(models.teacher, info, "cpu", cfg)
    one = [build_teacher(c, info, "cpu") for c in models.teacher]
    x = torch.randn(6, 3, SIZE, SIZE)
    torch.testing.assert_close(committee(x), (one[0](x) + one[1](x)) / 2)
    # the same member first alone, then in a committee: two post-trains, never resumed one from the other
    job = PosttrainJob(source="d", images_digest="x", num_images=12, teacher=models.teacher[0], test=None, info=info,
                       cfg=CFG, image_size=SIZE, small_input=True)
    weights = hashlib.sha256()  # how a single teacher was always fingerprinted: its runs keep resuming
    for k, v in sorted(models.teacher[0].state_dict.items()):
        weights.update(k.encode())
        weights.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    keep = {"cfg": fingerprint_view(CFG), "images": "x", "teacher": weights.hexdigest()[:16],
            "test": [info.name, SIZE], "seed": 0, "soft_labels": False}
    assert job.fingerprint() == hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()
                                               ).hexdigest()[:16]
    assert dataclasses.replace(job, teacher=models.teacher).fingerprint() != job.fingerprint()
    # bench table: the committee names the variant of its cells by both stems
    spec = TableSpec("synthetic", str(tmp_path / "table"), methods=("random",), overrides={"teacher": f"{a},{b}"})
    assert spec.variant("random") == "-teacher-ta+tb"
    assert cell_models(spec, "random", 1, 0) == {"teacher": f"{a},{b}"}


@pytest.mark.parametrize("teacher", ["a.pt,,b.pt", "backbone,a.pt", "a.pt,a.pt"])
def test_bad_committees_are_refused(teacher):
    with pytest.raises(ConfigError, match="teacher"):
        build_distill_config("synthetic", "out", {"teacher": teacher})
    with pytest.raises(ConfigError, match="posttrain.committee"):
        build_distill_config("synthetic", "out", {"posttrain.committee": "vote"})


# --- recover: category-aware BN matching (EDC) ---------------------------------------------------------

def _bn_inputs(model, x):
    """Every BN layer's input for the batch `x`, as NumPy arrays (captured apart from the code under test)."""
    layers = bn_layers(model)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, inp[0].detach().double().numpy()))
             for m in layers]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return [seen[m] for m in layers]


def test_class_statistics_against_numpy():
    torch.manual_seed(0)
    model = create_model("resnet18", 4, 0.125, True)
    x = torch.randn(13, 3, SIZE, SIZE)
    y = torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2])  # class 3 has no image
    stats = class_statistics(model, ((x[i:i + 5], y[i:i + 5]) for i in range(0, 13, 5)), 4)
    acts = _bn_inputs(model, x)
    assert len(stats) == len(acts) == len(bn_layers(model))
    for (mean, var, within), a in zip(stats, acts):
        for c in range(3):
            sel = a[y.numpy() == c]
            np.testing.assert_allclose(mean[c].numpy(), sel.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(var[c].numpy(), sel.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(within[c].numpy(), sel.var(axis=(2, 3)).mean(0), rtol=1e-4, atol=1e-5)
        assert float(mean[3].abs().sum()) == 0.0


def test_class_bn_term_against_numpy():
    torch.manual_seed(1)
    model = create_model("resnet18", 4, 0.125, True).eval()
    ref = class_statistics(model, [(torch.randn(16, 3, SIZE, SIZE), torch.arange(16) % 4)], 4)
    x, targets = torch.randn(5, 3, SIZE, SIZE), torch.tensor([2, 0, 2, 1, 0])
    weights = [10.0] + [1.0] * (len(ref) - 1)
    with ClassBNMatch(model, ref, targets, weights) as m:
        model(x)
        got = float(m.loss().detach())
    want = 0.0
    for w, a, (rm, rv, _) in zip(weights, _bn_inputs(model, x), ref):
        per_class = []
        for c in (0, 1, 2):  # the batch's classes
            sel = a[targets.numpy() == c]
            per_class.append(np.linalg.norm(sel.mean(axis=(0, 2, 3)) - rm[c].numpy())
                             + np.linalg.norm(sel.var(axis=(0, 2, 3)) - rv[c].numpy()))
        want += w * np.mean(per_class)
    assert got == pytest.approx(want, rel=1e-4)


def test_soft_class_bn_term_against_numpy():
    # EDC's form: the whole batch's statistics against its rows' classes' mean and within-image variance
    torch.manual_seed(1)
    model = create_model("resnet18", 4, 0.125, True).eval()
    ref = class_statistics(model, [(torch.randn(16, 3, SIZE, SIZE), torch.arange(16) % 4)], 4)
    x, targets = torch.randn(5, 3, SIZE, SIZE), torch.tensor([2, 0, 2, 1, 0])
    with ClassBNMatch(model, ref, targets, form="soft") as m:
        model(x)
        got = float(m.loss().detach())
    want = sum(np.linalg.norm(a.mean(axis=(0, 2, 3)) - rm.numpy()[targets.numpy()].mean(0))
               + np.linalg.norm(a.var(axis=(0, 2, 3)) - within.numpy()[targets.numpy()].mean(0))
               for a, (rm, _, within) in zip(_bn_inputs(model, x), ref))
    assert got == pytest.approx(want, rel=1e-4)


def test_smoothed_statistics_by_hand():
    state = {}
    first = torch.tensor([2.0, 4.0], requires_grad=True)
    (v1,) = smoothed(state, 0, (first,), 0.75)
    torch.testing.assert_close(v1.detach(), torch.tensor([2.0, 4.0]))  # the average starts at the first values
    second = torch.tensor([6.0, 0.0], requires_grad=True)
    (v2,) = smoothed(state, 0, (second,), 0.75)
    torch.testing.assert_close(v2.detach(), torch.tensor([3.0, 3.0]))  # 0.75 * 2 + 0.25 * 6, 0.75 * 4 + 0.25 * 0
    v2.sum().backward()
    torch.testing.assert_close(second.grad, torch.ones(2))  # the gradient of the current statistics, whole
    # in BNMatch: the second forward's term is the match of the averaged statistics
    torch.manual_seed(4)
    model = create_model("resnet18", 4, 0.125, True).eval()
    layers = bn_layers(model)
    x1, x2 = torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE)
    with BNMatch(model, momentum=0.5) as m:
        model(x1)
        model(x2)
        got = m.terms().detach()
    a1, a2 = _bn_inputs(model, x1), _bn_inputs(model, x2)
    for i, layer in enumerate(layers):
        mean = 0.5 * a1[i].mean(axis=(0, 2, 3)) + 0.5 * a2[i].mean(axis=(0, 2, 3))
        var = 0.5 * a1[i].var(axis=(0, 2, 3)) + 0.5 * a2[i].var(axis=(0, 2, 3))
        want = (np.linalg.norm(mean - layer.running_mean.numpy()) + np.linalg.norm(var - layer.running_var.numpy()))
        assert float(got[i]) == pytest.approx(want, rel=1e-4)


def test_class_bn_coef_moves_recover_and_zero_leaves_it():
    torch.manual_seed(2)
    model = frozen(create_model("resnet18", 4, 0.125, True))
    stats = class_statistics(model, [(torch.randn(16, 3, SIZE, SIZE), torch.arange(16) % 4)], 4)
    cfg = RecoverConfig(iterations=3, lr=0.1, bn_coef=0.1, jitter=2, classes_per_batch=4)
    targets = torch.arange(4)
    run = lambda c, s: synthesize(model, targets, c, (0.5,) * 3, (0.25,) * 3, SIZE, 7, class_stats=s).images  # noqa: E731
    base = run(cfg, None)
    assert torch.equal(run(cfg, stats), base)  # coefficient 0: statistics given or not, the same images
    assert not torch.equal(run(dataclasses.replace(cfg, class_bn_coef=1.0), stats), base)
    assert not torch.equal(run(dataclasses.replace(cfg, class_bn_coef=1.0, class_bn_form="soft"), stats), base)
    assert not torch.equal(run(dataclasses.replace(cfg, bn_smoothing=0.8), None), base)  # flatness
    with pytest.raises(ValueError, match="class_bn_coef"):
        run(dataclasses.replace(cfg, class_bn_coef=1.0), None)


def test_class_statistics_are_gathered_once_per_model(tmp_path, monkeypatch):
    cfg = build_distill_config("synthetic", str(tmp_path / "run"), {"models_dir": str(tmp_path / "m")})
    torch.manual_seed(3)
    ckpt_path = _teacher_file(tmp_path / "b.pt", 3)
    from scdd_ray.models.checkpoint import load_checkpoint
    ckpt = load_checkpoint(ckpt_path)
    first = cached_class_statistics(cfg, ckpt, "cpu")
    assert [f for f in os.listdir(tmp_path / "m") if not f.startswith(".")] == [
        os.path.basename(class_stats.stats_path(cfg, class_stats.weights_digest(ckpt)))]

    def refuse(*a, **k):
        raise AssertionError("gathered again")
    monkeypatch.setattr(class_stats, "class_statistics", refuse)
    again = cached_class_statistics(cfg, ckpt, "cpu")
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))


# --- recover: real starting images chosen by confidence, several patches each (RDED) ------------------

class Brightness(torch.nn.Module):
    """A model whose confidence in class 0 grows with an image's brightness: its ranking is known."""

    def forward(self, x):
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([10 * b, torch.zeros_like(b), torch.zeros_like(b), torch.zeros_like(b)], dim=1)


def test_candidates_are_drawn_from_the_seed_alone():
    pool = np.arange(100, 140)
    a, boxes = candidates(pool, 12, 3, seed=5)
    b, boxes_b = candidates(pool, 12, 3, seed=5)
    assert np.array_equal(a, b) and torch.equal(boxes, boxes_b)
    assert len(a) == 36 and len(np.unique(a)) == 12 and set(a) <= set(pool)  # 12 images, 3 crops each
    assert torch.allclose(boxes[:, 0], boxes[:, 1])  # square crops
    c, _ = candidates(pool, 12, 3, seed=6)
    assert not np.array_equal(a, c)
    whole, full = candidates(pool, 50, 0, seed=5)  # more asked than pooled: all of them, whole images
    assert sorted(whole) == list(pool) and torch.equal(full[0], torch.tensor([1.0, 1.0, 0.5, 0.5]))


def test_stitch_puts_patch_q_in_grid_cell_q():
    patches = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 4, 4).clone()  # patch q is the constant q
    img = stitch(patches, 2)
    assert torch.equal(img[0], torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3.0]]))


def test_confident_init_ranks_by_the_model_and_gives_each_ipc_index_its_own_patches():
    info = load_split("synthetic", "test", None, SIZE).info
    levels = torch.arange(20, dtype=torch.uint8) * 10  # image i has brightness 10 i
    images = levels.view(20, 1, 1, 1).expand(20, 3, SIZE, SIZE).clone()
    train = TensorImageSet(images, torch.zeros(20, dtype=torch.long), info)
    mean, std = (0.0,) * 3, (1.0,) * 3
    cfg = RecoverConfig(init="real", init_pool=8)
    model = Brightness()
    idx, _ = class_ranking(model, train, 0, cfg, SIZE, mean, std, run_seed=0, device="cpu")
    assert list(idx) == sorted(idx, reverse=True) and len(idx) == 8  # brightest (most confident) first
    x = confident_init(model, train, [0, 0, 0], [0, 1, 2], cfg, SIZE, mean, std, 0, "cpu")
    assert torch.allclose(x[:, 0, 0, 0] * 255, torch.tensor([float(10 * i) for i in idx[:3]]))  # ranks 0, 1, 2
    four = dataclasses.replace(cfg, init_patches=2)
    y = confident_init(Brightness(), train, [0, 0], [0, 1], four, SIZE, mean, std, 0, "cpu")
    cells = y[1, 0, ::SIZE // 2, ::SIZE // 2].flatten() * 255  # IPC index 1: ranks 4..7 in its four cells
    assert torch.allclose(cells, torch.tensor([float(10 * i) for i in idx[4:8]]), atol=1e-3)
    with pytest.raises(ValueError, match="init_pool"):
        confident_init(Brightness(), train, [0], [2], four, SIZE, mean, std, 0, "cpu")  # needs ranks 8..11


@pytest.mark.parametrize("values,key", [
    ({"recover.init_pool": 40}, "recover.init_pool"),  # needs init real
    ({"recover.init": "real", "recover.init_patches": 2}, "recover.init_patches"),  # needs a pool
    ({"recover.init": "real", "recover.init_crops": 5}, "recover.init_crops"),
    ({"recover.init": "real", "recover.init_pool": 7, "ipc": 2, "recover.init_patches": 2}, "recover.init_pool"),
    ({"recover.class_bn_coef": -1.0}, "recover.class_bn_coef"),
    ({"recover.class_bn_coef": 0.1, "recover.compile": True}, "recover.class_bn_coef"),
    ({"recover.class_bn_form": "hard"}, "recover.class_bn_form"),
    ({"recover.bn_smoothing": 1.0}, "recover.bn_smoothing"),
    ({"recover.bn_smoothing": 0.8, "recover.compile": True}, "recover.bn_smoothing"),
])
def test_recover_levers_are_validated(values, key):
    with pytest.raises(ConfigError, match=key):
        build_distill_config("synthetic", "out", values)


def test_every_lever_is_off_by_default_and_leaves_fingerprints():
    cfg = build_distill_config("digits", "out", {})
    assert cfg.fingerprint() == "5c4bc6e9fe4607f8"  # the digits main job
    view = fingerprint_view(cfg)
    for key in ("class_bn_coef", "class_bn_form", "bn_smoothing", "init_pool", "init_crops", "init_patches"):
        assert key not in view["recover"]
    on = build_distill_config("digits", "out", {"recover.init": "real", "recover.init_pool": 10,
                                                "recover.class_bn_coef": 0.01})
    assert {"init_pool", "class_bn_coef"} <= set(fingerprint_view(on)["recover"])


def test_a_shard_with_every_recover_lever_is_a_function_of_the_run_seed():
    train = load_split("synthetic", "train", None, SIZE)
    torch.manual_seed(5)
    model = frozen(create_model("resnet18", train.info.num_classes, 0.125, True))
    mean, std = train.info.mean, train.info.std
    stats = class_statistics(model, [(normalize(to_float(train.load(range(64))), mean, std),
                                      train.labels[:64])], train.info.num_classes)
    cfg = RecoverConfig(iterations=2, lr=0.1, bn_coef=0.1, jitter=2, classes_per_batch=4, init="real", init_pool=8,
                        init_crops=2, init_patches=2, class_bn_coef=0.1, class_bn_form="soft", bn_smoothing=0.5)
    shard = plan_shards(train.info.num_classes, 2, 4)[1]  # IPC index 1: ranked patches 4..7 of each class
    run = lambda seed, m: recover_shard(m, shard, cfg, mean, std, SIZE, seed, "cpu", train,  # noqa: E731
                                        class_stats=stats)[0].images
    first = run(0, model)
    twin = frozen(create_model("resnet18", train.info.num_classes, 0.125, True))
    twin.load_state_dict(model.state_dict())  # another process's replica: no cached ranking
    assert torch.equal(run(0, twin), first)
    assert not torch.equal(run(1, twin), first)
