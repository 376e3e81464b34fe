"""A post-train job: everything one post-train needs, its fingerprint (what decides the student, for resume),
and the checks that let it learn from soft labels stored by an earlier one."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..data import DatasetInfo, ImageSet
from ..errors import ConfigError
from ..models.checkpoint import Checkpoint, weights_digest
from ..store.soft_labels import SOFT_FORMAT, SOFT_META
from .committee import members
from .configs import PosttrainConfig, fingerprint_view
from .posttrain import global_batch, steps_per_epoch


@dataclass
class PosttrainJob:
    """Everything a post-train needs, checked by the caller."""

    source: str  # a distilled directory: manifest + shards, bare *.parquet, or reference ImageFolder
    images_digest: str
    num_images: int
    teacher: Checkpoint | tuple[Checkpoint, ...]  # one teacher, or a committee (core.committee)
    test: ImageSet
    info: DatasetInfo
    cfg: PosttrainConfig
    image_size: int
    small_input: bool
    seed: int = 0
    soft_labels: str | None = None  # read stored soft labels from this directory instead of running the teacher
    store_soft_labels: str | None = None  # write the teacher's top-k on every crop here
    topk: int = 10

    def fingerprint(self) -> str:
        """Everything that decides the student; placement and checkpoint frequency are left out."""
        cfg = fingerprint_view(self.cfg)  # settings added later are left out at their defaults: runs resume
        digests = [weights_digest(c) for c in members(self.teacher)]
        keep = {"cfg": cfg, "images": self.images_digest, "teacher": ",".join(digests),
                "test": [self.info.name, self.image_size], "seed": self.seed, "soft_labels": bool(self.soft_labels)}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def batch(self, world: int = 1) -> int:
        """The global batch on `world` workers (`global_batch`)."""
        return global_batch(self.cfg, self.num_images, world)


def soft_label_meta(job: PosttrainJob, complete: bool, world: int = 1) -> dict:
    """What training from stored labels (`soft_labels`) checks first."""
    batch = job.batch(world)
    return {"format": SOFT_FORMAT, "complete": complete, "images_digest": job.images_digest,
            "num_images": job.num_images, "num_classes": job.info.num_classes, "temperature": job.cfg.temperature,
            "topk": min(job.topk, job.info.num_classes), "epochs": job.cfg.epochs, "batch_size": batch,
            "steps_per_epoch": steps_per_epoch(job.num_images, batch), "seed": job.seed,
            "crop_scale": list(job.cfg.crop_scale), "crop": job.cfg.crop, "flip": job.cfg.flip, "mix": job.cfg.mix,
            "mix_prob": job.cfg.mix_prob, "image_size": job.image_size}


def check_soft_labels(root: str, cfg: PosttrainConfig, digest: str, num_classes: int, num_images: int,
                      world: int = 1) -> None:
    """Stored soft labels must be complete and made for these images, classes, temperature and batch."""
    path = os.path.join(root, SOFT_META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise ConfigError("soft_labels", f"{root} holds no stored soft labels ({SOFT_META} missing or unreadable)") from None
    if meta.get("format") != SOFT_FORMAT or not meta.get("complete"):
        raise ConfigError("soft_labels", f"{root} is incomplete (its post-train did not finish)")
    if meta.get("images_digest") != digest:
        raise ConfigError("soft_labels", f"{root} labels other images than `distilled` holds")
    for key, want, fld in (("num_classes", num_classes, "teacher"),
                           ("temperature", cfg.temperature, "posttrain.temperature"),
                           ("batch_size", global_batch(cfg, num_images, world), "posttrain.batch_size"),
                           ("crop", cfg.crop, "posttrain.crop")):
        if meta.get(key, "resized" if key == "crop" else None) != want:
            raise ConfigError(fld, f"{root} was stored with {key} {meta.get(key)}, this run uses {want}")
    if cfg.epochs > meta.get("epochs", 0):
        raise ConfigError("posttrain.epochs", f"{root} holds {meta.get('epochs', 0)} epochs of soft labels, "
                                              f"{cfg.epochs} asked for")
