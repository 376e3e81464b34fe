"""The settings of each stage as frozen dataclasses: squeeze, recover, post-train.

Part of the schema (scdd_ray.schema): these are the only defaults in code,
plain values that a dataset's preset file (scdd_ray/presets/*.yaml), a
`--config` file and the user's flags override, in that order. Each field
carries its help text and whether it decides a fingerprint (`setting`), so
the command line, the docs and the resume checks read one description.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SUPERVISED = "supervised"  # the SRe2L baseline's squeeze: end-to-end cross entropy

# How a field takes part in the fingerprints that let a rerun resume: "yes"; "no" (placement or how the
# maths runs, never what it computes); "later" (added after runs existed: left out while it holds its
# default, so those runs keep their fingerprint).
FINGERPRINT = ("yes", "no", "later")


def setting(default, help: str, fingerprint: str = "yes", **meta):
    """A schema field: its default, its help text, and how it enters fingerprints (FINGERPRINT)."""
    assert fingerprint in FINGERPRINT, fingerprint
    return dataclasses.field(default=default, metadata={"help": help, "fingerprint": fingerprint, **meta})


def fingerprint_view(obj) -> dict:
    """The fields of schema dataclass `obj` that decide its results, nested sections included, as a
    plain dict (what fingerprints hash): "no" fields dropped, "later" fields dropped at their default."""
    out = {}
    for f in dataclasses.fields(obj):
        how = f.metadata.get("fingerprint", "yes")
        value = getattr(obj, f.name)
        if how == "no" or (how == "later" and value == f.default):
            continue
        out[f.name] = fingerprint_view(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class SqueezeConfig:
    """Backbone training: SSL pretraining (an objective of core.ssl) + linear probe, or supervised."""

    method: str = setting("simclr", "backbone objective: an SSL method (simclr, mocov3) or supervised")
    epochs: int = setting(200, "training epochs of the backbone")
    batch_size: int = setting(256, "images per squeeze step")
    lr: float = setting(0.06, "squeeze learning rate (SGD, cosine)")
    weight_decay: float = setting(5e-4, "squeeze weight decay")
    temperature: float = setting(0.5, "NT-Xent / InfoNCE temperature")
    crop_scale: tuple[float, float] = setting((0.2, 1.0), "random-resized-crop area of the SSL views, LO,HI")
    flip: bool = setting(True, "random horizontal flips of the SSL views")
    probe_epochs: int = setting(100, "epochs of the linear probe on the frozen SSL backbone")


@dataclass(frozen=True)
class RecoverConfig:
    iterations: int = setting(1000, "recover iterations per batch")
    lr: float = setting(0.4, "recover learning rate (Adam, cosine)")
    bn_coef: float = setting(0.005, "BN-matching coefficient alpha")
    bn_weights: str = setting("first:10", "per-layer BN weights: first:M | linear:A,B | exp:G | w1,w2,...")
    jitter: int = setting(4, "largest random roll of the images each step, in pixels")
    crop_scale: tuple[float, float] | None = setting(None, "random-resized-crop area each step, LO,HI, or none")
    flip: bool = setting(False, "random horizontal flips each step")
    init: str = setting("noise", "noise | real (start from a random real image of the class)")
    classes_per_batch: int = setting(100, "classes optimised together in one batch")
    grayscale: bool = setting(False, "optimise one channel repeated to three (grayscale datasets)")
    bn_normalize: str = setting("none", "none (paper: sum over BN layers) | mean (over layers) | channel")
    augment_per: str = setting("image", "image: a crop box and flip per image | batch: one for the whole batch "
                                        "(authors')", fingerprint="later")
    ipc_per_shard: int = setting(1, "consecutive IPC indices optimised together in one batch", fingerprint="later")
    class_bn_coef: float = setting(0.0, "coefficient of category-aware BN matching: each class's feature mean and "
                                        "variance in the batch matched to that class's over the real training "
                                        "images (EDC; gathered once, cached beside the models); 0: off",
                                   fingerprint="later")
    class_bn_form: str = setting("class", "category-aware matching: class (each class of the batch against its "
                                          "own statistics) | soft (EDC's code: the batch's statistics against "
                                          "the average of its classes')", fingerprint="later")
    bn_smoothing: float = setting(0.0, "flatness (EDC): BN terms match a moving average of the batch statistics "
                                       "over iterations with this momentum, the gradient of the current ones (EDC's "
                                       "CIFAR code: 0.8); 0: off", fingerprint="later")
    init_pool: int = setting(0, "init real: real images of each class scored by the recovery model, the ones it "
                                "is most confident on kept (RDED's realism score); 0: random images",
                             fingerprint="later")
    init_crops: int = setting(0, "init real with init_pool: random square crops (area 8-100%) scored per pooled "
                                 "image, its best kept (RDED); 0: the whole image", fingerprint="later")
    init_patches: int = setting(1, "init real with init_pool: each starting image a KxK grid of the K*K best "
                                   "patches (RDED at low IPC); 1: one image", fingerprint="later")
    compile: bool = setting(False, "torch.compile the recover step (off until measured faster: "
                                   "benchmarks/RESULTS.md)", fingerprint="no")
    compile_backend: str = setting("inductor", "torch.compile backend of the recover step (eager: capture "
                                               "without code generation)", fingerprint="no")
    amp: str = setting("bf16", "autocast on GPU: bf16 | none (CPU always runs float32)", fingerprint="no")


@dataclass(frozen=True)
class PosttrainConfig:
    student: str = setting("resnet18", "student architecture")
    student_width: float = setting(1.0, "student channel width multiplier")
    epochs: int = setting(200, "post-train epochs")
    batch_size: int = setting(64, "images per post-train step (global batch; see batch_per_worker)")
    optimizer: str = setting("adamw", "adamw | sgd")
    lr: float = setting(1e-3, "post-train learning rate")
    weight_decay: float = setting(0.01, "post-train weight decay")
    temperature: float = setting(30.0, "knowledge-distillation temperature")
    mix: str = setting("cutmix", "mixing of each batch: cutmix | mixup | none")
    mix_prob: float = setting(1.0, "share of batches that are mixed")
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "random-resized-crop area, LO,HI")
    flip: bool = setting(True, "random horizontal flips")
    eval_every: int = setting(0, "also evaluate every E epochs (0: only at the end)")
    checkpoint_every: int = setting(0, "epochs between Ray Train checkpoints (0: about 20 per run)",
                                    fingerprint="no")
    amp: str = setting("bf16", "autocast dtype on GPU: bf16 | fp16 | none (CPU always runs float32)")
    labels: str = setting("soft", "soft: the teacher's, on each crop (KD) | hard: the images' classes, cross "
                                  "entropy, no teacher", fingerprint="later")
    crop: str = setting("resized", "resized: random-resized-crop of crop_scale | padded: RandomCrop(size, "
                                   "padding=4)", fingerprint="later")
    batch_per_worker: bool = setting(False, "batch_size images per post-train worker (global batch x workers, lr "
                                            "scaled) instead of per step", fingerprint="later")
    cosine_period: float = setting(1.0, "the cosine lr schedule's period as a multiple of the run: 1 decays to "
                                        "zero at the end; 3 ends at 0.75 of the rate (the authors' CIFAR scripts)",
                                   fingerprint="later")
    teacher_bn: str = setting("eval", "the relabelling teacher's BatchNorm: eval (its running statistics) | "
                                      "train (each batch's own statistics, as the authors' CIFAR scripts; with "
                                      "several workers, each worker's slice of the batch)", fingerprint="later")
    committee: str = setting("prob", "how a committee of teachers (`teacher` lists several) combines its soft "
                                     "labels: prob (mean probability at the KD temperature) | logit (mean logits)",
                             fingerprint="later")
    ema: float = setting(0.0, "evaluate an exponential moving average of the student with this decay, e.g. 0.999 "
                              "(0: the student itself; EDC)", fingerprint="later")
