"""Public ResNet checkpoints (torchvision, MoCo-v2/v3, DINO, SwAV) read offline into our models: one
entry of PUBLIC_LAYOUTS per layout."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .checkpoint import nonfinite_weights
from .factory import ARCHS, create_model

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
