"""Joining a Ray cluster, and checking it can place what a run asks for."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading

import ray
import ray._private.ray_constants
import torch

from ..errors import ConfigError, Terminated
from ..schema import JOIN_TIMEOUT_S

# Asks the GCS at argv[1] for its cluster id, as ray.init does first; run in a child process, which can be
# killed when nothing answers (Ray's client retries in C++, out of reach of a Python timeout).
_GCS_PROBE = "import sys; from ray._raylet import GcsClient; GcsClient(address=sys.argv[1])"


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join `address` (auto, host:port, ray://host:port) or start a private local Ray instance.

    Raises ConnectionError with a one-line reason when the cluster cannot be reached, or when no Ray
    cluster answers at host:port within JOIN_TIMEOUT_S seconds. A SIGTERM handler installed with
    `handle_sigterm` stays in place (ray.init replaces it, and Ray's C++ one would abort the process).
    """
    if address and address != "auto":
        hostport = address.split("://", 1)[-1]
        host, _, port = hostport.rpartition(":")
        if "://" in address and importlib.util.find_spec("grpc") is None:
            raise ConnectionError(f"{address} is a Ray Client address, but this install lacks Ray Client "
                                  "(pip install 'ray[client]'); or give the cluster's GCS address, host:port")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            raise ConnectionError(f"cannot reach Ray cluster at {address} ({e.__class__.__name__})") from None
        if "://" not in address and not ray.is_initialized():
            _check_gcs(address, host or "127.0.0.1", int(port))
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ours = signal.getsignal(signal.SIGTERM) is _on_sigterm
    if ours:  # no C++ failure handler in this process: on SIGTERM it dumps a stack and aborts (exit 134)
        ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:  # sized as `local_resources` says, so checks made before Ray starts hold after
            ray.init(num_cpus=num_cpus or local_resources()["CPU"], include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"cannot join Ray cluster at {address}: {first}") from None
    except SystemExit:  # ray.init's own SIGTERM handler (sys.exit), in place while it runs
        if not ours:
            raise
        _sigterm["received"] = True
        raise Terminated() from None
    finally:
        if ours:  # ray.init installed its handler over ours
            handle_sigterm()


def _check_gcs(address: str, host: str, port: int) -> None:
    """Wait at most JOIN_TIMEOUT_S for a Ray GCS to answer at `address`; ConnectionError naming the address
    and what answered instead. A probe that fails at once is left to ray.init, which says why."""
    try:
        subprocess.run([sys.executable, "-c", _GCS_PROBE, address], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=JOIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConnectionError(f"no Ray cluster answered at {address} within {JOIN_TIMEOUT_S:g}s: "
                              f"{_what_answers(host, port)}") from None


def _what_answers(host: str, port: int, wait: float = 1.0) -> str:
    """What the service at host:port says, in words, for the error about a port that is not Ray's."""
    data = b""
    try:
        with socket.create_connection((host, port), timeout=wait) as s:
            s.settimeout(wait)
            try:
                data = s.recv(200)  # services that speak first (SSH, SMTP, ...)
                if not data:
                    return "something there accepts TCP connections, then closes them"
            except socket.timeout:
                s.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
                data = s.recv(200)
    except OSError:
        pass
    first = data.replace(b"\r", b"\n").split(b"\n")[0].decode("ascii", "replace").strip()[:60]
    if first.startswith("HTTP/"):
        return (f"an HTTP server answers there ({first!r}), not a Ray GCS; the dashboard's port? join at the "
                "cluster's GCS address (port 6379 unless the head was started with another --port)")
    if first:
        return f"a service that is not Ray answers there ({first!r})"
    return "something there accepts TCP connections but does not answer as a Ray GCS"


_sigterm = {"received": False}


def _on_sigterm(signum, frame) -> None:
    if _sigterm["received"]:  # one is enough: the run is already stopping
        return
    _sigterm["received"] = True
    raise Terminated()


def handle_sigterm() -> None:
    """From now on SIGTERM stops this process as Ctrl-C does (`Terminated`, a KeyboardInterrupt); `connect`
    keeps the handler in place through ray.init. Only the main thread can install it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def sigterm_received() -> bool:
    """Whether a SIGTERM arrived: ray.get turns every interrupt into a plain KeyboardInterrupt."""
    return _sigterm["received"]


def reset_sigterm() -> None:
    _sigterm["received"] = False


def shutdown() -> None:
    """Stop this process's Ray (its actors and workers with it), if it started or joined one."""
    if ray.is_initialized():
        ray.shutdown()


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
