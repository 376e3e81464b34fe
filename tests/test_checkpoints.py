"""Public SSL checkpoints: tiny fakes in each layout researchers have on disk."""
import argparse
import os

import pytest
import torch
from test_cli_errors import run_err

from scdd_ray.cli import main
from scdd_ray.errors import CheckpointError
from scdd_ray.models.checkpoint import load_checkpoint
from scdd_ray.models.factory import create_model
from scdd_ray.models.public import import_backbone, infer_resnet, model_from_import


def backbone_state(arch="resnet18", width=0.125, small_input=False, seed=0):
    torch.manual_seed(seed)
    m = create_model(arch, 10, width, small_input)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):  # non-trivial BN statistics
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return m, {k: v.clone() for k, v in m.state_dict().items()}


def body(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def mocov3(state):
    sd = {f"module.base_encoder.{k}": v for k, v in body(state).items()}
    sd |= {"module.base_encoder.fc.0.weight": torch.randn(16, 64), "module.base_encoder.fc.1.running_mean": torch.zeros(16),
           "module.predictor.0.weight": torch.randn(16, 16)}
    sd |= {f"module.momentum_encoder.{k}": v + 1 for k, v in body(state).items()}
    return {"epoch": 300, "arch": "resnet50", "state_dict": sd, "optimizer": {"param_groups": [{"lr": 0.1}]}}


def mocov2(state):
    sd = {f"module.encoder_q.{k}": v for k, v in body(state).items()} | {"module.encoder_q.fc.0.weight": torch.randn(8, 64)}
    sd |= {f"module.encoder_k.{k}": v * 2 for k, v in body(state).items()} | {"module.queue": torch.randn(8, 32),
                                                                              "module.queue_ptr": torch.zeros(1)}
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd}


def swav(state):
    sd = {f"module.{k}": v for k, v in body(state).items()}
    sd |= {"module.projection_head.0.weight": torch.randn(32, 64), "module.prototypes.weight": torch.randn(30, 16)}
    return sd


def dino_plain(state):
    return body(state)


def dino_full(state):
    teacher = {f"backbone.{k}": v for k, v in body(state).items()} | {"head.mlp.0.weight": torch.randn(8, 64)}
    student = {f"module.backbone.{k}": v - 1 for k, v in body(state).items()}
    return {"teacher": teacher, "student": student, "epoch": 100, "args": argparse.Namespace(arch="resnet50")}


@pytest.mark.parametrize("layout,make,dropped", [
    ("mocov3", mocov3, ("module.predictor.0.weight", "module.base_encoder.fc.0.weight")),
    ("mocov2", mocov2, ("module.queue", "module.encoder_k.conv1.weight", "module.encoder_q.fc.0.weight")),
    ("swav", swav, ("module.prototypes.weight", "module.projection_head.0.weight")),
    ("torchvision", dino_plain, ()),
    ("dino", dino_full, ("head.mlp.0.weight",)),
])
def test_public_layouts_load_the_backbone_exactly(tmp_path, layout, make, dropped):
    model, state = backbone_state()
    path = tmp_path / f"{layout}.pth"
    torch.save(make(state), path)
    imp = import_backbone(str(path))
    assert (imp.layout, imp.arch, imp.width, imp.small_input) == (layout, "resnet18", 0.125, False)
    assert set(dropped) <= set(imp.dropped)
    assert set(imp.state_dict) == set(body(state))
    for k, v in body(state).items():  # the base/teacher encoder, not the momentum/student copy
        assert torch.equal(imp.state_dict[k], v), k
    loaded, has_head = model_from_import(imp, 10)
    assert not has_head and torch.count_nonzero(loaded.fc.weight) == 0
    model.eval(), loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.forward_features(x), loaded.forward_features(x))


def test_torchvision_head(tmp_path):
    _, state = backbone_state()
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    imp = import_backbone(str(path))
    model, has_head = model_from_import(imp, 10)
    assert has_head and torch.equal(model.fc.weight, state["fc.weight"])
    model, has_head = model_from_import(imp, 4)  # another label set: the head must be fitted
    assert not has_head and torch.count_nonzero(model.fc.weight) == 0


def test_architecture_is_inferred_from_the_weights():
    for arch, width, small in (("resnet50", 0.0625, True), ("resnet101", 0.03125, False), ("resnet18", 0.25, True)):
        state = create_model(arch, 3, width, small).state_dict()
        assert infer_resnet(state) == (arch, width, small)


def test_unknown_and_missing_keys_are_named(tmp_path):
    _, state = backbone_state()
    ck = mocov3(state)
    ck["state_dict"]["module.base_encoder.layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(ck, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"module\.base_encoder\.layer5\.0\.conv1\.weight"):
        import_backbone(str(tmp_path / "extra.pth"))
    ck = mocov3(state)
    del ck["state_dict"]["module.base_encoder.layer2.1.bn1.running_var"]
    torch.save(ck, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"lacks resnet18 weights: layer2\.1\.bn1\.running_var"):
        import_backbone(str(tmp_path / "missing.pth"))
    sd = swav(state) | {"module.queue_of_something": torch.zeros(3)}
    torch.save(sd, tmp_path / "stray.pth")
    with pytest.raises(CheckpointError, match="queue_of_something"):
        import_backbone(str(tmp_path / "stray.pth"))
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="no ResNet"):
        import_backbone(str(tmp_path / "vit.pth"))


def test_squeeze_from_a_public_checkpoint_fits_only_the_head(tmp_path, capsys):
    _, state = backbone_state(width=0.125, small_input=True)
    src = tmp_path / "moco.pth.tar"
    torch.save(mocov3(state), src)
    out = tmp_path / "probed.pt"
    assert main(["squeeze", "--dataset", "synthetic", "--from", str(src), "--out", str(out)]) == 0
    ck = load_checkpoint(str(out))
    assert (ck.method, ck.arch, ck.width, ck.meta["layout"]) == ("mocov3", "resnet18", 0.125, "mocov3")
    for k, v in body(state).items():  # BN statistics (and all backbone weights) exactly as published
        assert torch.equal(ck.state_dict[k], v), k
    assert torch.count_nonzero(ck.state_dict["fc.weight"]) > 0
    line = run_err(capsys, ["squeeze", "--dataset", "synthetic", "--from", str(src), "--arch", "resnet50",
                            "--out", str(tmp_path / "x.pt")])
    assert "--arch" in line and "resnet18" in line
    assert not (tmp_path / "x.pt").exists()


def test_distill_refuses_public_checkpoint_of_another_arch_and_bad_weight_lists(tmp_path, capsys):
    _, state = backbone_state("resnet50", 0.0625, True)
    src = tmp_path / "swav_r50.pth"
    torch.save(swav(state), src)
    out = tmp_path / "run"
    line = run_err(capsys, ["distill", "--dataset", "digits", "--backbone", str(src), "--out", str(out)])
    assert "--backbone" in line and "resnet50" in line and "--arch resnet18" in line
    line = run_err(capsys, ["distill", "--dataset", "digits", "--bn-weights", "1,2,3", "--out", str(out)])
    assert "--bn-weights" in line and "lists 3 weights" in line and "20 BatchNorm2d" in line
    line = run_err(capsys, ["distill", "--dataset", "digits", "--bn-normalize", "depth", "--out", str(out)])
    assert "--bn-normalize" in line
    assert not out.exists()
    # A teacher must already classify the dataset's classes: an SSL file without a head is refused.
    _, st18 = backbone_state("resnet18", 0.25, True)
    torch.save(mocov3(st18), tmp_path / "moco18.pth")
    line = run_err(capsys, ["distill", "--dataset", "digits", "--teacher", str(tmp_path / "moco18.pth"),
                            "--out", str(out)])
    assert "--teacher" in line and "no classifier for 10 classes" in line and "squeeze" in line
    assert not out.exists()


def test_distill_probes_a_public_ssl_backbone_and_keeps_its_bn_statistics(tmp_path, ray_session):
    import json

    _, state = backbone_state("resnet18", 0.125, True)
    src = tmp_path / "r-18-moco.pth.tar"
    torch.save(mocov3(state), src)
    out = tmp_path / "run"
    assert main(["-q", "distill", "--dataset", "synthetic", "--backbone", str(src), "--num-workers", "1",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["backbone_method"] == "mocov3" and rep["num_images"] == 8
    probed = [f for f in os.listdir(out / "backbones") if f.startswith("probe-mocov3-r-18-moco")]
    assert len(probed) == 1 and rep["backbone"].endswith(probed[0])
    ck = load_checkpoint(str(out / "backbones" / probed[0]))
    for k, v in body(state).items():
        assert torch.equal(ck.state_dict[k], v), k
