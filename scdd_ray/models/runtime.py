"""How the pipeline runs a model: frozen for recover and relabelling, under autocast on GPUs."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


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
