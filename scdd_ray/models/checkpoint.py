"""Our checkpoint format: a model's weights with everything needed to rebuild and feed it, written
atomically and read without running pickled code."""
from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, NotOurCheckpoint
from ..store.atomic import atomic_write_bytes
from .factory import ARCHS, TIMM_PREFIX, create_model


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


def weights_digest(ckpt: Checkpoint) -> str:
    """16 hex digits of sha256 over the checkpoint's weights (names and bytes): what derived files keyed by a
    model (post-train fingerprints, cached per-class statistics) name it by."""
    h = hashlib.sha256()
    for k, v in sorted(ckpt.state_dict.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
