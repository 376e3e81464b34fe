"""Run by tests/test_gpu_placement.py in a process of its own: a Ray instance with two declared GPUs on this
CPU machine (`ray.init(num_gpus=2)`), and `scdd-ray distill --num-gpus 2` through it with the device compute
replaced by the CPU here, in test code: the synthesis actor is a subclass defined in this file, and the Ray
Train worker loop a wrapper from this file around the real one (this file runs as __main__, so Ray sends
both by value). Every actor and worker writes the GPU ids Ray gave it; the driver's calls are logged in order.
Prints one JSON line: {"actors": [...], "workers": [...], "calls": [...]}."""
import json
import os
import sys

import ray
import torch

OUT = sys.argv[1]
RECORD = os.path.join(OUT, "placed")
os.makedirs(RECORD, exist_ok=True)


def placed(kind: str, device: str | None = None) -> None:
    with open(os.path.join(RECORD, f"{kind}-{os.getpid()}.json"), "w") as f:
        json.dump({"kind": kind, "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                   "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device}, f)


def main() -> int:
    from ray.train.torch import TorchConfig

    from scdd_ray.cli import main as cli
    from scdd_ray.dist import posttrain as dist_posttrain
    from scdd_ray.dist import synthesis
    from scdd_ray.pipeline import distill

    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    calls = []

    class SynthesisOnCpu(synthesis.SynthesisWorker):
        def __init__(self, cfg, image_size, run_seed, threads, use_gpu):
            assert use_gpu
            placed("actor")
            super().__init__(cfg, image_size, run_seed, threads, use_gpu=False)  # the compute on the CPU

    real_loop = dist_posttrain.train_loop_per_worker

    def loop_on_cpu(config):
        import ray.train.torch as rtt

        placed("worker", str(rtt.get_device()))  # the device the real loop would train on
        rtt.get_device = lambda: torch.device("cpu")
        rtt.prepare_model = lambda m: torch.nn.parallel.DistributedDataParallel(m)  # gloo, on the CPU
        real_loop(config)

    def logged(name, fn):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return call

    synthesis.SynthesisWorker = SynthesisOnCpu
    dist_posttrain.train_loop_per_worker = loop_on_cpu
    dist_posttrain.TorchConfig = lambda backend: TorchConfig(backend="gloo")  # no NCCL without CUDA
    distill.release_gpu = logged("release_gpu", distill.release_gpu)
    distill.run_ray = logged("run_ray", distill.run_ray)
    distill.run_posttrain = logged("run_posttrain", distill.run_posttrain)
    address = ray.get_runtime_context().gcs_address
    rc = cli(["-q", "distill", "--dataset", "synthetic", "--num-gpus", "2", "--posttrain-workers", "2",
              "--address", address, "--out", os.path.join(OUT, "run"), "--width", "0.125", "--ipc", "2",
              "--squeeze-epochs", "1", "--squeeze-probe-epochs", "1", "--recover-iterations", "2",
              "--posttrain-epochs", "1", "--posttrain-student-width", "0.125"])
    rows = [json.load(open(os.path.join(RECORD, f))) for f in sorted(os.listdir(RECORD))]
    print(json.dumps({"rc": rc, "calls": calls, "actors": [r for r in rows if r["kind"] == "actor"],
                      "workers": [r for r in rows if r["kind"] == "worker"]}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
