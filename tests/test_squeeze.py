import copy
import dataclasses

import torch

from scdd_ray.config import SqueezeConfig
from scdd_ray.data import load_split
from scdd_ray.models import create_model
from scdd_ray.core.squeeze import linear_probe, pretrain_ssl, squeeze
from scdd_ray.core.ssl import NTXentLoss

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
