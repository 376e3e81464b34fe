"""Joining a Ray cluster, and checking it can place what a run asks for."""
from __future__ import annotations

import os
import socket

import ray
import torch

from ..errors import ConfigError


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join `address` (auto, host:port, ray://host:port) or start a private local Ray instance.

    Raises ConnectionError with a one-line reason when the cluster cannot be reached.
    """
    if address and address != "auto":
        hostport = address.split("://", 1)[-1]
        host, _, port = hostport.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            raise ConnectionError(f"cannot reach Ray cluster at {address} ({e.__class__.__name__})") from None
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:  # sized as `local_resources` says, so checks made before Ray starts hold after
            ray.init(num_cpus=num_cpus or local_resources()["CPU"], include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"cannot join Ray cluster at {address}: {first}") from None


def worker_error(e: BaseException) -> str:
    """The last line of a failed actor's or worker's traceback (`RuntimeError: CUDA error: ...`).

    Their logs are not forwarded to the driver (`log_to_driver=False` keeps the
    terminal readable), so this line is what the user gets to see of a CUDA or
    NCCL failure; the exception type alone would say nothing.
    """
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(getattr(e, "cause", None) or e).__name__


def is_running() -> bool:
    return ray.is_initialized()


def cluster_resources() -> dict:
    return ray.cluster_resources()


def local_resources() -> dict:
    """What a private local Ray instance started by `connect` gets: every core of this machine, every
    visible GPU (Ray's own guess can be smaller under a cgroup quota, and then one actor per core,
    the default, would wait forever)."""
    return {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}


def free_resources() -> str:
    """'N of M CPUs, K of L GPUs free' on the running cluster, for progress lines and errors."""
    total, free = ray.cluster_resources(), ray.available_resources()
    return ", ".join(f"{free.get(k, 0):g} of {total.get(k, 0):g} {k}s free" for k in ("CPU", "GPU"))


def placeable_now(use_gpu: bool, threads: int = 1) -> tuple[int, str]:
    """How many workers of one GPU (or `threads` CPUs) the cluster has free resources for now, and
    those resources in words (`free_resources`)."""
    free, words = ray.available_resources(), free_resources()
    if use_gpu:
        return int(min(free.get("GPU", 0), free.get("CPU", 0))), words
    return int(free.get("CPU", 0) // threads), words


def cluster_gpus() -> int:
    return int(cluster_resources().get("GPU", 0))


def placement(num_workers: int, use_gpu: bool, threads: int = 1, field: str = "num_workers",
              resources: dict | None = None) -> dict:
    """Check the cluster can place `num_workers` workers; returns the resources of one worker.

    Ray Train would otherwise wait for resources forever. `resources` are the
    cluster totals (default: the running Ray cluster's). A CPU worker reserves
    `threads` CPUs and runs that many torch threads: on CPU, scale with workers
    (DDP) first; two torch threads on a busy 2-core machine ran one epoch 60x
    slower than one thread here (OpenMP threads waiting on each other).
    `field` is the setting the worker count came from, for the error.
    """
    if resources is None:
        resources = cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if use_gpu:
        if num_workers > gpus:
            raise ConfigError(field, f"{num_workers} GPU workers need {num_workers} GPUs but the Ray cluster has {gpus}")
        return {"CPU": 1, "GPU": 1}
    if num_workers * threads > cpus:
        raise ConfigError(field, f"{num_workers} workers need {num_workers * threads} CPUs but the Ray cluster has "
                                 f"{cpus}")
    return {"CPU": threads}
