"""Where a result came from: the command, the code's commit and the machine, written into every benchmark
JSON so that a number can be traced back and rerun."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess

import torch


def commit(path: str | None = None) -> str | None:
    """The git commit of the checkout holding `path` (this package by default), `+dirty` when its tracked
    files differ from it; None outside a git checkout (an installed wheel) or without git."""
    where = os.path.dirname(os.path.abspath(path or __file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


# The vector extensions a CPU's float kernels are chosen by: bf16 autocast rounds differently with and
# without them, so one run repeated on two hosts can differ in the last digits of its top-1.
_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU's model name and which of _ISA it has; what is unknown (no /proc, another OS) is left out."""
    try:
        text = open(cpuinfo).read()
    except OSError:
        return {"cpu_model": platform.processor()} if platform.processor() else {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last core's, all alike
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    out = {"cpu_model": fields["model name"]} if "model name" in fields else {}
    if "flags" in fields:
        flags = set(fields["flags"].split())
        out["cpu_isa"] = [f for f in _ISA if f in flags]
    return out


def machine() -> dict:
    """What the numbers depend on: CPU (model and vector extensions), thread count, torch and any GPUs."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"arch": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count(), **cpu(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "gpus": gpus}


def provenance(argv: list[str] | tuple[str, ...]) -> dict:
    """`command` (as a shell line a reader can paste), `commit`, `machine` of this process's run."""
    return {"command": shlex.join(["scdd-ray", *argv]), "commit": commit(), "machine": machine()}


def stamped(result: dict, argv: list[str] | tuple[str, ...]) -> dict:
    """`result` with its provenance first; provenance's keys win (a result's own `machine` string is older)."""
    p = provenance(argv)
    return {**p, **{k: v for k, v in result.items() if k not in p}}
