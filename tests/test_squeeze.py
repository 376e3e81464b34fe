import copy
import dataclasses

import pytest
import torch

from scdd_ray.config import SqueezeConfig
from scdd_ray.core.squeeze import linear_probe, pretrain_ssl, squeeze
from scdd_ray.core.ssl import NTXentLoss
from scdd_ray.data import load_split
from scdd_ray.models.factory import create_model

CFG = SqueezeConfig(method="simclr", epochs=1, batch_size=16, lr=0.05, crop_scale=(0.5, 1.0), flip=False,
                    probe_epochs=30)


def test_ntxent_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    loss = NTXentLoss(0.5)
    assert loss(z, z + 0.01 * torch.randn(8, 16)) < loss(z, torch.randn(8, 16))
    # 2N-2 negatives: for identical random embeddings the loss is bounded below by 0
    assert loss(z, z) > 0


def test_linear_probe_keeps_ssl_bn_statistics_bit_identical():
    train = load_split("synthetic", "train", image_size=16)
    torch.manual_seed(0)
    model = create_model("resnet18", 4, width=0.125)
    pretrain_ssl(model, train, CFG, "cpu", seed=0)
    after_ssl = copy.deepcopy(model.state_dict())
    # SSL really moved the running statistics away from their initial values
    assert not torch.equal(after_ssl["bn1.running_mean"], torch.zeros_like(after_ssl["bn1.running_mean"]))
    linear_probe(model, train, CFG, "cpu", seed=0)
    probed = model.state_dict()
    for k, v in after_ssl.items():
        if not k.startswith("fc."):
            assert torch.equal(v, probed[k]), k
    assert not torch.equal(after_ssl["fc.weight"], probed["fc.weight"])


def test_probe_and_supervised_learn_the_synthetic_classes():
    from scdd_ray.core.evaluation import top1

    train = load_split("synthetic", "train", image_size=16)
    test = load_split("synthetic", "test", image_size=16)
    for method in ("simclr", "mocov3", "supervised"):
        m = squeeze(train, "resnet18", 0.125, dataclasses.replace(CFG, method=method, epochs=3), seed=0)
        assert top1(m, test, train.info.mean, train.info.std) >= 75.0, method


def _np_ce(logits, target):
    import numpy as np

    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(target)), target].mean())


def test_ntxent_and_info_nce_match_numpy_references():
    import numpy as np

    from scdd_ray.core.ssl import info_nce

    torch.manual_seed(1)
    z1, z2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    a, b = z1.numpy(), z2.numpy()
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T / 0.5
    np.fill_diagonal(sim, -np.inf)
    want = _np_ce(sim, np.concatenate([np.arange(5, 10), np.arange(5)]))
    assert abs(float(NTXentLoss(0.5)(z1, z2)) - want) < 1e-5  # the loss computes in float32
    q, k = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    want = _np_ce(q @ k.T / 0.2, np.arange(5)) * 2 * 0.2
    assert abs(float(info_nce(z1, z2, 0.2)) - want) < 1e-5


def test_a_registered_ssl_objective_is_a_squeeze_method(monkeypatch):
    """Adding an SSL method is one registered class: config accepts it and squeeze trains with it."""
    from scdd_ray.config import build_distill_config
    from scdd_ray.core import ssl

    monkeypatch.setattr(ssl, "_REGISTRY", dict(ssl._REGISTRY))
    calls = []

    @ssl.register("cosine")
    class Cosine(ssl.SimCLR):  # pull the two views' projections together, no negatives
        def loss(self, model, v1, v2, step, total):
            calls.append(step)
            p1, p2 = self.projector(ssl.features(model, v1)), self.projector(ssl.features(model, v2))
            return -torch.nn.functional.cosine_similarity(p1, p2).mean()

    cfg = build_distill_config("synthetic", "out", {"squeeze.method": "cosine"})
    assert cfg.squeeze.method == "cosine"
    train = load_split("synthetic", "train", image_size=16)
    torch.manual_seed(0)
    model = create_model("resnet18", 4, width=0.125)
    before = model.layer1[0].conv1.weight.clone()
    pretrain_ssl(model, train, dataclasses.replace(CFG, method="cosine"), "cpu", seed=0)
    assert calls == list(range(len(calls))) and len(calls) == len(train) // CFG.batch_size
    assert not torch.equal(before, model.layer1[0].conv1.weight)


# --- resumable squeeze: a stopped run goes on where it stopped, as if never stopped --------------------------------

class _Stop(Exception):
    pass


def _stop_after(monkeypatch, n_steps: int) -> None:
    """The next squeeze dies after `n_steps` optimiser steps, as a killed process would (no cleanup of ours runs)."""
    import scdd_ray.core.squeeze as sq

    class Dying(sq.Progress):
        def update(self, n=1, **postfix):
            super().update(n, **postfix)
            if self.n >= n_steps:
                raise _Stop

    monkeypatch.setattr(sq, "Progress", Dying)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _run(train, cfg, resume=None):
    from scdd_ray.core.squeeze import squeeze as run

    return _weights(run(train, "resnet18", 0.125, cfg, seed=1, resume=resume))



@pytest.mark.parametrize("method,stop_at", [("supervised", 3), ("simclr", 3), ("mocov3", 2)])
def test_a_stopped_squeeze_resumes_to_the_same_model(tmp_path, monkeypatch, method, stop_at):
    from scdd_ray.core.squeeze import Resume

    train = load_split("synthetic", "train", image_size=16)
    cfg = dataclasses.replace(CFG, method=method, epochs=2, probe_epochs=2)  # 72 rows / 16: 4 steps an epoch
    whole = _run(train, cfg)
    path = str(tmp_path / "m.pt.partial")
    with monkeypatch.context() as m:
        _stop_after(m, stop_at)  # in the middle of the first epoch (in-memory set: resumed mid-epoch)
        with pytest.raises(_Stop):
            _run(train, cfg, Resume(path, "k", every_s=0.0))
    saved = torch.load(path, weights_only=True)
    # it died inside its step `stop_at`, before that step's save: the file holds the step before
    assert saved["step"] == stop_at - 1 and saved["order"] is not None
    resumed = _run(train, cfg, Resume(path, "k", every_s=0.0))
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_saves_at_epoch_ends_only_when_not_due_and_other_settings_start_over(tmp_path, monkeypatch):
    from scdd_ray.core.squeeze import Resume

    train = load_split("synthetic", "train", image_size=16)
    cfg = dataclasses.replace(CFG, method="supervised", epochs=2, probe_epochs=2)
    whole = _run(train, cfg)
    path = str(tmp_path / "m.pt.partial")
    with monkeypatch.context() as m:
        _stop_after(m, 7)
        with pytest.raises(_Stop):
            _run(train, cfg, Resume(path, "k", every_s=1e9))
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 4 and saved["order"] is None  # the first epoch's end; steps 5-6 are lost
    other = _run(train, cfg, Resume(path, "other settings", every_s=1e9))  # never resumes a foreign run
    assert all(torch.equal(whole[k], other[k]) for k in whole)
    resumed = _run(train, cfg, Resume(path, "k", every_s=1e9))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_squeeze_and_save_resumes_and_removes_its_progress_file(tmp_path, monkeypatch):
    import scdd_ray.backbones as backbones
    from scdd_ray.config import build_config
    from scdd_ray.models.checkpoint import load_checkpoint
    from scdd_ray.schema import RESUME_SUFFIX

    cfg = build_config({"dataset": "synthetic", "squeeze.method": "supervised", "squeeze.epochs": 2,
                        "width": 0.125}, run=False)
    train = cfg.split("train")
    out = str(tmp_path / "b.pt")
    monkeypatch.setattr(backbones, "SQUEEZE_SAVE_EVERY_S", 0.0)
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        with pytest.raises(_Stop):
            backbones.squeeze_and_save(out, cfg, train, "cpu")
    assert not (tmp_path / "b.pt").exists() and (tmp_path / ("b.pt" + RESUME_SUFFIX)).exists()
    # the progress carries the seconds it took; say the stopped processes had run for 500 s
    partial = tmp_path / ("b.pt" + RESUME_SUFFIX)
    state = torch.load(partial, weights_only=True)
    assert 0 < state["seconds"] < 60
    torch.save({**state, "seconds": 500.0}, partial)
    backbones.squeeze_and_save(out, cfg, train, "cpu", cfg.split("test"))
    assert not (tmp_path / ("b.pt" + RESUME_SUFFIX)).exists()
    assert 500 < load_checkpoint(out).meta["seconds"] < 560  # the model's whole cost, not this process's
    fresh = str(tmp_path / "fresh.pt")
    backbones.squeeze_and_save(fresh, cfg, train, "cpu")
    a, b = load_checkpoint(out).state_dict, load_checkpoint(fresh).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
