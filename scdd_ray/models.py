"""Backbone factory and checkpoints.

The ResNets here keep torchvision's parameter names (conv1, bn1, layer1.0.conv1,
..., fc) so torchvision and SSL state dicts load into them unchanged, and add
what torchvision lacks: a width multiplier (tiny models for CPU tests) and the
3x3 stride-1 stem without max-pool used for 32x32 and smaller inputs.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

ARCHS = ("resnet18", "resnet50", "resnet101")
_LAYOUT = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
TIMM_PREFIX = "timm:"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-compatible ResNet with a width multiplier.

    `forward_features` returns the pooled embedding (what SSL trains and the
    linear probe reads); `forward` adds the linear head `fc`.
    """

    def __init__(self, block: type, layers: tuple[int, ...], num_classes: int, width: float, small_input: bool):
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[3] * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init of the last BN in each residual branch: standard practice that
        # makes each block start as identity and stabilises short trainings.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def create_model(name: str, num_classes: int, width: float = 1.0, small_input: bool = True) -> nn.Module:
    """Build an untrained backbone with a linear head.

    `name` is one of ARCHS, or `timm:<model>` for any timm architecture (built
    without pretrained weights: nothing is downloaded; `width` must stay 1).
    """
    if name.startswith(TIMM_PREFIX):
        import timm

        if width != 1.0:
            raise ValueError(f"width {width} is not supported for timm models (only our resnets scale width)")
        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes)
    if name not in _LAYOUT:
        raise ValueError(f"unknown arch {name!r} (choose from {', '.join(ARCHS)} or timm:<name>)")
    if width <= 0:
        raise ValueError(f"width must be > 0 (got {width})")
    kind, layers = _LAYOUT[name]
    block = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, layers, num_classes, width, small_input)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled embedding of any supported model (ours or timm)."""
    if isinstance(model, ResNet):
        return model.forward_features(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def head(model: nn.Module) -> nn.Linear:
    if isinstance(model, ResNet):
        return model.fc
    return model.get_classifier()


def autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (where it pays), a no-op elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the form recover and relabel use."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class Checkpoint:
    """A backbone plus everything needed to rebuild and feed it."""

    arch: str
    width: float
    num_classes: int
    image_size: int
    small_input: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: str
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        model = create_model(self.arch, self.num_classes, self.width, self.small_input)
        model.load_state_dict(self.state_dict)
        return model


FORMAT = "scdd-ray-checkpoint/1"


def save_checkpoint(path: str, model: nn.Module, *, arch: str, width: float, num_classes: int, image_size: int,
                    small_input: bool, mean, std, method: str, meta: dict | None = None) -> None:
    """Write atomically: a crash never leaves a truncated checkpoint at `path`."""
    payload = {
        "format": FORMAT, "arch": arch, "width": float(width), "num_classes": int(num_classes),
        "image_size": int(image_size), "small_input": bool(small_input), "mean": [float(m) for m in mean],
        "std": [float(s) for s in std], "method": method,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str) -> Checkpoint:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an scdd-ray checkpoint (no '{FORMAT}' header)")
    ckpt = Checkpoint(
        arch=payload["arch"], width=payload["width"], num_classes=payload["num_classes"],
        image_size=payload["image_size"], small_input=payload["small_input"], mean=tuple(payload["mean"]),
        std=tuple(payload["std"]), method=payload["method"], state_dict=payload["state_dict"],
        meta=payload.get("meta", {}),
    )
    try:
        ckpt.build()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match its arch {ckpt.arch} width {ckpt.width}: {first}") from None
    return ckpt
