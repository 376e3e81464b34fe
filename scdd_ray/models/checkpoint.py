"""Our checkpoint format: a model's weights with everything needed to rebuild and feed it, written
atomically and read without running pickled code."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, NotOurCheckpoint
from ..store.atomic import atomic_write_bytes
from .factory import create_model


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
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise NotOurCheckpoint(f"checkpoint {path} is not an scdd-ray checkpoint (no '{FORMAT}' header)")
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
