"""The settings of each stage as frozen dataclasses: squeeze, recover, post-train.

Plain values with the authors' defaults; `scdd_ray.config` validates them at
the boundary and fills them from a dataset's preset and the user's overrides.
"""
from __future__ import annotations

from dataclasses import dataclass

SUPERVISED = "supervised"  # the SRe2L baseline's squeeze: end-to-end cross entropy


@dataclass(frozen=True)
class SqueezeConfig:
    """Backbone training: SSL pretraining (an objective of core.ssl) + linear probe, or supervised."""

    method: str = "simclr"
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.06
    weight_decay: float = 5e-4
    temperature: float = 0.5  # NT-Xent / InfoNCE temperature
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip: bool = True
    probe_epochs: int = 100


@dataclass(frozen=True)
class RecoverConfig:
    iterations: int = 1000
    lr: float = 0.4
    bn_coef: float = 0.005
    bn_weights: str = "first:10"
    jitter: int = 4
    crop_scale: tuple[float, float] | None = None  # None: no random-resized-crop
    flip: bool = False
    init: str = "noise"
    classes_per_batch: int = 100
    grayscale: bool = False  # optimise one channel repeated to three
    bn_normalize: str = "none"  # none (paper: sum over layers) | mean | channel
    augment_per: str = "image"  # image: a crop box and flip per image | batch: one for the whole batch (authors')
    ipc_per_shard: int = 1  # consecutive IPC indices optimised together in one batch
    compile: bool = False  # torch.compile the forward + loss (off until measured faster: benchmarks/RESULTS.md)
    amp: str = "bf16"  # autocast on GPU: bf16 or none (CPU always runs float32)


@dataclass(frozen=True)
class PosttrainConfig:
    student: str = "resnet18"
    student_width: float = 1.0
    epochs: int = 200
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 30.0
    mix: str = "cutmix"
    mix_prob: float = 1.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    eval_every: int = 0  # 0: evaluate on the real test split only at the end
    checkpoint_every: int = 0  # epochs between Ray Train checkpoints; 0: about 20 per run
    amp: str = "bf16"  # autocast dtype on GPU: bf16, fp16 or none (CPU always runs float32)
    labels: str = "soft"  # soft: the teacher's, on each crop (KD); hard: the images' classes, cross entropy
    crop: str = "resized"  # resized: random-resized-crop of crop_scale | padded: RandomCrop(size, padding=4)
    # False: one global batch of batch_size whatever the worker count. True: batch_size per worker
    # (global batch x workers) with the lr scaled to it (core.training.scaled_lr).
    batch_per_worker: bool = False
