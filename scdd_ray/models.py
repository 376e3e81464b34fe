"""Backbone factory and checkpoints.

The ResNets here keep torchvision's parameter names (conv1, bn1, layer1.0.conv1,
..., fc) so torchvision and SSL state dicts load into them unchanged, and add
what torchvision lacks: a width multiplier (tiny models for CPU tests) and the
3x3 stride-1 stem without max-pool used for 32x32 and smaller inputs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import CheckpointError, NotOurCheckpoint
from .store import atomic_write_bytes

ARCHS = ("resnet18", "resnet50", "resnet101")
_LAYOUT = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
TIMM_PREFIX = "timm:"
SMALL_INPUT_MAX = 64  # images up to this side use the 3x3 stride-1 stem without max-pool (CIFAR-style)


def small_input(image_size: int) -> bool:
    return image_size <= SMALL_INPUT_MAX


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
        import timm  # deferred: a heavy import that only timm: architectures need

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


def autocast(device, amp: str = "bf16") -> contextlib.AbstractContextManager:
    """bf16 (default) or fp16 autocast on CUDA, where it pays; a no-op on CPU or with amp="none"."""
    if torch.device(device).type == "cuda" and amp != "none":
        return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
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
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str) -> Checkpoint:
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file (.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise NotOurCheckpoint(f"checkpoint {path} is not an scdd-ray checkpoint (no '{FORMAT}' header)")
    header_problem = _header_problem(payload)
    if header_problem:
        raise CheckpointError(f"checkpoint {path}: {header_problem}")
    ckpt = Checkpoint(
        arch=payload["arch"], width=float(payload["width"]), num_classes=payload["num_classes"],
        image_size=payload["image_size"], small_input=payload["small_input"],
        mean=tuple(float(m) for m in payload["mean"]), std=tuple(float(s) for s in payload["std"]),
        method=payload["method"], state_dict=payload["state_dict"], meta=payload.get("meta", {}),
    )
    try:
        ckpt.build()
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match its arch {ckpt.arch} width {ckpt.width}: {first}") from None
    weights_problem = nonfinite_weights(ckpt.state_dict)
    if weights_problem:
        raise CheckpointError(f"checkpoint {path}: {weights_problem}")
    return ckpt


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _header_problem(payload: dict) -> str:
    """What is wrong with the header of one of our checkpoints ('' if nothing): every field there, of its type."""
    missing = [k for k in ("arch", "width", "num_classes", "image_size", "small_input", "mean", "std", "method",
                           "state_dict") if k not in payload]
    if missing:
        return f"its header has no {', '.join(repr(k) for k in missing)}"
    arch = payload["arch"]
    timm = isinstance(arch, str) and arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX)
    if not (arch in ARCHS or timm):
        return f"its arch {arch!r} is not one of {', '.join(ARCHS)} or timm:<name>"
    checks = (
        ("width", _number(payload["width"]) and payload["width"] > 0, "a positive number"),
        ("num_classes", isinstance(payload["num_classes"], int) and not isinstance(payload["num_classes"], bool)
         and payload["num_classes"] >= 1, "a positive integer"),
        ("image_size", isinstance(payload["image_size"], int) and not isinstance(payload["image_size"], bool)
         and payload["image_size"] >= 1, "a positive integer"),
        ("small_input", isinstance(payload["small_input"], bool), "true or false"),
        ("mean", isinstance(payload["mean"], (list, tuple)) and len(payload["mean"]) == 3
         and all(_number(m) for m in payload["mean"]), "three finite numbers"),
        ("std", isinstance(payload["std"], (list, tuple)) and len(payload["std"]) == 3
         and all(_number(s) and s > 0 for s in payload["std"]), "three positive numbers (normalisation divides by it)"),
        ("method", isinstance(payload["method"], str), "a string"),
        ("state_dict", isinstance(payload["state_dict"], dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()),
         "a mapping of names to tensors"),
        ("meta", isinstance(payload.get("meta", {}), dict), "a mapping"),
    )
    for key, ok, want in checks:
        if not ok:
            value = payload[key]
            shown = type(value).__name__ if isinstance(value, (dict, torch.Tensor)) else repr(value)
            return f"its {key} {shown[:60]} is not {want}"
    return ""


def nonfinite_weights(state: dict[str, torch.Tensor]) -> str:
    """What makes a state dict unusable ('' if nothing): a weight or BN statistic that is NaN or infinite
    (a model that diverged, or a damaged file), or a negative BN running variance."""
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        if not bool(torch.isfinite(v).all()):
            return f"{k} holds NaN or infinite values (the model diverged, or the file is damaged)"
        if k.endswith("running_var") and bool((v < 0).any()):
            return f"{k} holds negative variances (the file is damaged)"
    return ""


def is_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint of ours (by its header), read without running pickled code."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for foreign or damaged files
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_state_file(path: str) -> dict:
    """A training state scdd-ray wrote (tensors, numbers, strings, lists and dicts only).

    Read with weights_only, so a pickle planted in its place in an output
    directory is refused, never run. A file that is not such a state (planted,
    truncated by a full disk, damaged) is a CheckpointError naming it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path} is not a training state scdd-ray wrote, or is damaged "
                              f"({type(e).__name__}); it was not loaded") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a training state scdd-ray wrote (a {type(state).__name__})")
    return state


# --- public (self-supervised) checkpoints ----------------------------------------

# (layout, prefix of the backbone's keys, prefixes of keys dropped on purpose:
# projection/prediction heads, momentum encoders, queues, prototypes, and the
# supervised classifier `fc`, since a new linear head is fitted on our labels).
# Order matters: the more specific prefixes come before SwAV's bare `module.`.
PUBLIC_LAYOUTS = (
    ("mocov3", "module.base_encoder.", ("module.base_encoder.fc.", "module.momentum_encoder.", "module.predictor.")),
    ("mocov2", "module.encoder_q.", ("module.encoder_q.fc.", "module.encoder_k.", "module.queue")),
    ("dino", "module.backbone.", ("module.head.",)),
    ("dino", "backbone.", ("head.",)),
    ("swav", "module.", ("module.projection_head.", "module.prototypes.", "module.fc.")),
    ("torchvision", "", ()),  # fc is kept apart as a possible classifier (supervised torchvision models)
)


@dataclass
class ImportedBackbone:
    """Backbone weights read from a public checkpoint, in our (torchvision) key names."""

    layout: str
    arch: str
    width: float
    small_input: bool
    state_dict: dict[str, torch.Tensor]
    dropped: list[str]
    head: dict[str, torch.Tensor] | None = None  # a torchvision classifier (fc), when the file has one


def _unwrap(payload: Any) -> dict:
    """The state dict inside the containers research code saves."""
    if isinstance(payload, dict):
        if "state_dict" in payload and isinstance(payload["state_dict"], dict):
            return payload["state_dict"]
        if "teacher" in payload and isinstance(payload["teacher"], dict):  # DINO full checkpoint: the EMA teacher
            return payload["teacher"]
        if "model" in payload and isinstance(payload["model"], dict):
            return payload["model"]
    return payload


def infer_resnet(state: dict[str, torch.Tensor]) -> tuple[str, float, bool]:
    """(arch, width, small_input) of a torchvision-named ResNet state dict."""
    if "conv1.weight" not in state or "layer3.0.conv1.weight" not in state:
        raise CheckpointError("no ResNet stem/stage weights (conv1.weight, layer3.0.conv1.weight) found")
    stem = state["conv1.weight"]
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layer3.")}
    bottleneck = "layer1.0.conv3.weight" in state
    n3 = max(blocks) + 1
    by_shape = {(False, 2): "resnet18", (True, 6): "resnet50", (True, 23): "resnet101"}
    arch = by_shape.get((bottleneck, n3))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(f"a ResNet with {n3} {kind} blocks in layer3 is not one of {', '.join(ARCHS)}")
    return arch, round(stem.shape[0] / 64, 6), stem.shape[-1] == 3


def import_backbone(path: str) -> ImportedBackbone:
    """Read a torchvision / MoCo-v2 / MoCo-v3 / DINO / SwAV ResNet checkpoint, offline.

    Heads named in PUBLIC_LAYOUTS are dropped; any other key our ResNet does
    not have is an error naming it, never silently ignored.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file (.pt or .pth)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:  # DINO's full checkpoints pickle their argparse.Namespace next to the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({type(e).__name__})") from None
    raw = _unwrap(payload)
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    for layout, prefix, drop in PUBLIC_LAYOUTS:
        if prefix and not any(k.startswith(prefix) for k in raw):
            continue
        dropped = sorted(k for k in raw if k.startswith(drop))
        stray = sorted(k for k in raw if not k.startswith(prefix) and k not in dropped)
        state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix) and k not in dropped}
        break
    head = None
    if layout == "torchvision" and {"fc.weight", "fc.bias"} <= set(state):
        head = {"weight": state.pop("fc.weight"), "bias": state.pop("fc.bias")}
    try:
        arch, width, small = infer_resnet(state)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path} ({layout} layout): {e}") from None
    expected = {k for k in create_model(arch, 2, width, small).state_dict() if not k.startswith("fc.")}
    unknown = stray + [prefix + k for k in sorted(set(state) - expected)]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CheckpointError(f"checkpoint {path} ({layout} layout) has keys a {arch} does not use: {shown}")
    missing = sorted(expected - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {path} ({layout} layout) lacks {arch} weights: {shown}")
    problem = nonfinite_weights({**state, **{f"fc.{k}": v for k, v in (head or {}).items()}})
    if problem:
        raise CheckpointError(f"checkpoint {path} ({layout} layout): {problem}")
    return ImportedBackbone(layout, arch, width, small, state, dropped, head)


def model_from_import(imp: ImportedBackbone, num_classes: int) -> tuple[nn.Module, bool]:
    """The imported backbone and whether its head is trained for `num_classes`.

    A torchvision classifier with `num_classes` outputs is kept (a supervised
    model, e.g. the SRe2L recovery model or the authors' ImageNet teacher);
    otherwise the head is zero and must be fitted (linear probe) before use.
    """
    model = create_model(imp.arch, num_classes, imp.width, imp.small_input)
    try:
        model.load_state_dict(imp.state_dict, strict=False)
    except RuntimeError as e:  # names were checked by import_backbone; this is a shape mismatch
        raise CheckpointError(f"weights do not fit {imp.arch} width {imp.width}: "
                              f"{str(e).strip().splitlines()[-1].strip()}") from None
    fc = model.fc
    if imp.head is not None and tuple(imp.head["weight"].shape) == tuple(fc.weight.shape):
        fc.load_state_dict(imp.head)
        return model, True
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    return model, False


def num_bn_layers(arch: str) -> int:
    """BatchNorm2d layers of `arch` (counted on a 1-channel-wide copy, so it is cheap)."""
    model = create_model(arch, 2, 1.0 if arch.startswith(TIMM_PREFIX) else 1 / 64)
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class Renormalize(nn.Module):
    """Feed a model trained with other mean/std: re-map normalised inputs first."""

    def __init__(self, model: nn.Module, from_mean, from_std, to_mean, to_std):
        super().__init__()
        self.model = model
        fm, fs = torch.tensor(from_mean).view(1, -1, 1, 1), torch.tensor(from_std).view(1, -1, 1, 1)
        tm, ts = torch.tensor(to_mean).view(1, -1, 1, 1), torch.tensor(to_std).view(1, -1, 1, 1)
        self.register_buffer("scale", fs / ts)
        self.register_buffer("shift", (fm - tm) / ts)

    def forward(self, x):
        return self.model(x * self.scale + self.shift)


def adapt_inputs(model: nn.Module, ckpt: Checkpoint, info) -> nn.Module:
    """`model` (built from `ckpt`) fed inputs normalised with `info`'s mean/std (a data.DatasetInfo)."""
    if np.allclose(ckpt.mean, info.mean, atol=1e-4) and np.allclose(ckpt.std, info.std, atol=1e-4):
        return model
    return Renormalize(model, info.mean, info.std, ckpt.mean, ckpt.std)
