import pytest
import torch

from scdd_ray.core.bn import bn_layers
from scdd_ray.errors import CheckpointError
from scdd_ray.models.checkpoint import load_checkpoint, save_checkpoint
from scdd_ray.models.factory import create_model


@pytest.mark.parametrize("arch,n_bn", [("resnet18", 20), ("resnet50", 53), ("resnet101", 104)])
def test_architectures_have_torchvision_bn_counts(arch, n_bn):
    m = create_model(arch, 7, width=0.0625)
    assert len(bn_layers(m)) == n_bn
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_width_scales_channels_and_stem():
    small = create_model("resnet18", 10, width=0.25, small_input=True)
    assert small.conv1.out_channels == 16 and small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert small.fc.in_features == 128
    big = create_model("resnet18", 10, width=1.0, small_input=False)
    assert big.conv1.kernel_size == (7, 7) and big.fc.in_features == 512


def test_full_width_resnet18_matches_torchvision_state_dict():
    import torchvision

    ours = create_model("resnet18", 1000, width=1.0, small_input=False)
    tv = torchvision.models.resnet18(weights=None)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    ours.load_state_dict(tv.state_dict())


def test_bad_arch_and_width():
    with pytest.raises(ValueError, match="unknown arch"):
        create_model("vgg11", 10)
    with pytest.raises(ValueError, match="width"):
        create_model("resnet18", 10, width=0)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = create_model("resnet18", 4, width=0.125)
    p = tmp_path / "m.pt"
    save_checkpoint(str(p), m, arch="resnet18", width=0.125, num_classes=4, image_size=16, small_input=True,
                    mean=(0.5,) * 3, std=(0.25,) * 3, method="simclr", meta={"x": 1})
    ck = load_checkpoint(str(p))
    assert ck.method == "simclr" and ck.meta == {"x": 1} and ck.image_size == 16
    rebuilt = ck.build()
    for k, v in m.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"state_dict": m.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an scdd-ray checkpoint"):
        load_checkpoint(str(tmp_path / "plain.pt"))
