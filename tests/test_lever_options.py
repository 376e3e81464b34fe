"""The levers of the SRe2L family as options of their stages (issue 24): each one's maths against hand or
NumPy values, and each off by default (fingerprints of earlier runs unchanged)."""
import dataclasses

import pytest
import torch

from scdd_ray.config import PosttrainConfig, build_distill_config
from scdd_ray.core.configs import fingerprint_view
from scdd_ray.core.ema import ema_decay, ema_update
from scdd_ray.core.posttrain import PostTrainer
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
