"""The levers of the SRe2L family as options of their stages (issue 24): each one's maths against hand or
NumPy values, and each off by default (fingerprints of earlier runs unchanged)."""
import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from scdd_ray.backbones import plan_models, resolve_models
from scdd_ray.bench.table import TableSpec, cell_models
from scdd_ray.config import PosttrainConfig, build_config, build_distill_config
from scdd_ray.core.committee import committee_logits
from scdd_ray.core.configs import fingerprint_view
from scdd_ray.core.ema import ema_decay, ema_update
from scdd_ray.core.posttrain import PostTrainer, build_teacher
from scdd_ray.core.posttrain_job import PosttrainJob
from scdd_ray.models.checkpoint import save_checkpoint
from scdd_ray.models.factory import create_model
from scdd_ray.data import load_split
from scdd_ray.errors import ConfigError

SIZE = 16
CFG = PosttrainConfig(student="resnet18", student_width=0.125, epochs=3, batch_size=5, lr=2e-3, temperature=4.0,
                      mix="cutmix", mix_prob=1.0, crop_scale=(0.5, 1.0), flip=True, checkpoint_every=1)


def _info():
    return load_split("synthetic", "test", None, SIZE).info


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


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
