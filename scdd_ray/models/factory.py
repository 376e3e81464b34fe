"""Building models by name: our ResNets (any width) or any timm architecture (`timm:<name>`), and what every
model offers the pipeline (its pooled features, its linear head, its BatchNorm layers)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .resnet import LAYOUTS, ResNet

ARCHS = tuple(LAYOUTS)

TIMM_PREFIX = "timm:"

SMALL_INPUT_MAX = 64  # images up to this side use the 3x3 stride-1 stem without max-pool (CIFAR-style)


def small_input(image_size: int) -> bool:
    return image_size <= SMALL_INPUT_MAX


def create_model(name: str, num_classes: int, width: float = 1.0, small_input: bool = True) -> nn.Module:
    """Build an untrained backbone with a linear head.

    `name` is one of ARCHS, or `timm:<model>` for any timm architecture (built
    without pretrained weights: nothing is downloaded; `width` must stay 1).
    """
    if name.startswith(TIMM_PREFIX):
        import timm  # deferred: a heavy import that only timm: architectures need

        if width != 1.0:
            raise ValueError(f"width {width} is not supported for timm models (only our resnets scale width)")
        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes)
    if name not in LAYOUTS:
        raise ValueError(f"unknown arch {name!r} (choose from {', '.join(ARCHS)} or timm:<name>)")
    if width <= 0:
        raise ValueError(f"width must be > 0 (got {width})")
    block, layers = LAYOUTS[name]
    return ResNet(block, layers, num_classes, width, small_input)


def timm_model_exists(name: str) -> bool:
    """Whether timm can build the architecture `name` (without the `timm:` prefix), without building it."""
    import timm  # deferred: a heavy import that only timm: architectures need

    return timm.is_model(name)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled embedding of any supported model (ours or timm)."""
    if isinstance(model, ResNet):
        return model.forward_features(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def head(model: nn.Module) -> nn.Linear:
    if isinstance(model, ResNet):
        return model.fc
    return model.get_classifier()


def num_bn_layers(arch: str) -> int:
    """BatchNorm2d layers of `arch` (counted on a 1-channel-wide copy, so it is cheap)."""
    model = create_model(arch, 2, 1.0 if arch.startswith(TIMM_PREFIX) else 1 / 64)
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
