"""The schema: every setting of every command, as frozen dataclasses holding the only defaults in code.

A run's recipe is a `DistillConfig` (top-level fields plus the squeeze,
recover and post-train sections of core.configs). A dataset's preset file
(scdd_ray/presets/<dataset>-<cpu|gpu>.yaml) overrides these defaults, a
`--config` file overrides the preset and flags override both
(scdd_ray.config builds and validates the result). What a command needs
beyond the recipe (where to write, which cells a table has) is an options
dataclass below. The command line is generated from these fields (their
`group` and `help`), so a field means the same in every command.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from . import data
from .core.configs import PosttrainConfig, RecoverConfig, SqueezeConfig, fingerprint_view, setting
from .methods import TABLE
from .models.factory import small_input

SECTIONS = ("squeeze", "recover", "posttrain")
HOLDOUT_SPLITS = {"train": "train-noval", "test": "val"}
TEACHER_BACKBONE = "backbone"  # `teacher` value: relabel with the recovery backbone instead of the shared teacher


def teacher_paths(teacher: str | None) -> tuple[str, ...]:
    """The checkpoints a `teacher` value names: none (the default teacher), one, or a committee written as
    comma-separated paths (`a.pt,b.pt`)."""
    return tuple(p.strip() for p in teacher.split(",")) if teacher else ()
# Joining a cluster at host:port waits at most this long for its GCS to answer (ray.init alone would wait
# forever on a port where something else answers TCP: another service, the dashboard).
JOIN_TIMEOUT_S = 30.0
# A squeeze saves its progress beside its output (OUT.pt + RESUME_SUFFIX) this often and at each epoch's end:
# a stopped run loses at most this much training, and saving a ResNet-101's state takes well under a second.
SQUEEZE_SAVE_EVERY_S = 300.0
RESUME_SUFFIX = ".partial"


def _top(default, help: str, group: str, fingerprint: str = "yes", **meta):
    """A top-level field of the recipe; `group` is its argument group (data, run, ray)."""
    return setting(default, help, fingerprint, group=group, **meta)


def _section(cls: type, help: str):
    return dataclasses.field(default_factory=cls, metadata={"help": help, "fingerprint": "yes"})


@dataclass(frozen=True)
class DistillConfig:
    """The recipe of a run: what `distill` does, and what `bench` and `tune` vary cell by cell."""

    dataset: str = _top("digits", "dataset name (see docs/datasets.md)", "data")
    out: str = _top("", "output directory; rerun the same command to resume", "run", "no")
    data_dir: str | None = _top(None, "local dataset directory (Hugging Face Parquet, CIFAR python layout, "
                                      "ImageFolder)", "data")
    image_size: int = _top(32, "image side in pixels (the data's own size for Parquet sets)", "data")
    image_column: str | None = _top(None, "Parquet datasets: the image column (default: img or image)", "data",
                                    "later")
    label_column: str | None = _top(None, "Parquet datasets: the label column (default: label, labels or "
                                          "fine_label)", "data", "later")
    # Choose settings without reading the test split: everything trains on the train split less its
    # validation share (`train-noval`), and top-1 is measured on that validation share.
    holdout: bool = _top(False, "choose settings without the test split: train on train less its validation "
                                "share, report top-1 on that share (the test split is never read)", "data", "later")
    # The one read of the test split after a holdout screen: the screen's models and real images (both from
    # `train-noval`) stay valid, and the cached models are found by the same names, so nothing is squeezed
    # again; only top-1 moves from the validation share to the test split.
    train_noval: bool = _top(False, "train on train less its validation share (as `holdout` does) but report "
                                    "top-1 on the test split: reads once on test what a holdout screen chose, "
                                    "with its models", "data", "later")
    arch: str = _top("resnet18", "recovery backbone: resnet18, resnet50, resnet101 or timm:<name>", "run")
    width: float = _top(1.0, "channel width multiplier of the backbones (1.0: the paper's models)", "run")
    ipc: int = _top(10, "images per class", "run")
    method: str = _top("scdd", "scdd (SSL backbone) | sre2l (supervised backbone) | random (real images) | a named "
                               "recipe: scdd-patches (real patches, a short recovery; docs/levers.md)", "run")
    seed: int = _top(0, "run seed: squeezes, recover and post-train draw from it", "run")
    backbone: str | None = _top(None, "checkpoint to recover from (default: squeeze one, cached)", "run")
    teacher: str | None = _top(None, "checkpoint that relabels crops (default: a supervised model of `arch`, the "
                                     "same for every method; 'backbone': the recovery backbone); several, comma-"
                                     "separated: a committee whose soft labels are averaged (posttrain.committee)",
                               "run", "no")
    models_dir: str | None = _top(None, "where squeezed backbones and teachers are cached and looked up (default: "
                                        "OUT/backbones); share it between runs, tables and sweeps", "run", "no")
    num_gpus: int = _top(0, "one synthesis actor (and post-train worker) per GPU; 0: CPU actors", "ray", "no")
    num_workers: int | None = _top(None, "CPU synthesis actors (default: one per core)", "ray", "no")
    address: str | None = _top(None, "join an existing Ray cluster: auto, or its GCS address host:port (gives up "
                                     f"after {JOIN_TIMEOUT_S:g} s if no Ray cluster answers there), or "
                                     "ray://host:port (needs ray[client])", "ray", "no")
    posttrain_workers: int = _top(1, "Ray Train workers of the post-train stage (one GPU each with num_gpus)",
                                  "ray", "no")
    squeeze: SqueezeConfig = _section(SqueezeConfig, "backbone training")
    recover: RecoverConfig = _section(RecoverConfig, "image synthesis")
    posttrain: PosttrainConfig = dataclasses.field(default_factory=PosttrainConfig,
                                                   metadata={"help": "student training", "fingerprint": "no"})

    @property
    def small_input(self) -> bool:
        return small_input(self.image_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def data_options(self) -> dict:
        """The dataset's own options that are set (see data.DatasetSpec.options)."""
        return {k: v for k, v in (("image_column", self.image_column), ("label_column", self.label_column))
                if v is not None}

    def split(self, name: str):
        """One split of this run's dataset (data.ImageSet); under `holdout`, "train" is train-noval and
        "test" the validation split; under `train_noval`, "train" is train-noval only."""
        if self.holdout:
            name = HOLDOUT_SPLITS.get(name, name)
        elif self.train_noval and name == "train":
            name = HOLDOUT_SPLITS["train"]
        return data.load_split(self.dataset, name, self.data_dir, self.image_size, **self.data_options())

    @property
    def train_split(self) -> str:
        """The split name models of this run are squeezed on (names cached backbones)."""
        return HOLDOUT_SPLITS["train"] if self.holdout or self.train_noval else "train"

    @property
    def eval_split(self) -> str:
        return HOLDOUT_SPLITS["test"] if self.holdout else "test"

    def fingerprint(self) -> str:
        """Hash of everything that decides the synthetic images (the fields whose `fingerprint` is not "no").

        Placement (workers, GPUs, address), the output path, the teacher and
        post-training settings do not change which images a shard holds, so a
        run may be resumed with other resources or re-evaluated with another
        student. Settings added after the first release are left out while
        they hold their default, so runs made before them keep their fingerprint.
        """
        return hashlib.sha256(json.dumps(fingerprint_view(self), sort_keys=True, default=str).encode()
                              ).hexdigest()[:16]


# --- what commands need beyond the recipe -------------------------------------------------

def _opt(default, help: str, **meta):
    return setting(default, help, "no", **meta)


@dataclass(frozen=True)
class ConfigFileOptions:
    config: str | None = _opt(None, "a configuration file (YAML, or a run's run.json): the preset, then this "
                                    "file, then the flags")
    print_config: bool = _opt(False, "print the resolved configuration as YAML and exit (nothing is written)",
                              action="store_true")


@dataclass(frozen=True)
class SqueezeOptions:
    out: str = _opt("", "checkpoint path (.pt)", required=True)
    from_checkpoint: str | None = _opt(None, "public SSL checkpoint (torchvision, MoCo-v2/v3, DINO, SwAV): only fit "
                                             "the linear head", flag="--from")


@dataclass(frozen=True)
class PosttrainOptions:
    distilled: str = _opt("", "a distill output dir, its distilled/ dir, or an images/ folder", required=True)
    out: str = _opt("", "output directory; rerun the same command to resume", required=True)
    threads_per_worker: int = _opt(1, "CPUs (torch threads) each CPU worker reserves")
    store_soft_labels: bool = _opt(False, "also write the teacher's top-k probabilities on every crop to "
                                          "OUT/soft_labels/", action="store_true")
    topk: int = _opt(10, "probabilities kept per crop with --store-soft-labels")
    soft_labels: str | None = _opt(None, "train from soft labels stored by --store-soft-labels (the teacher is "
                                         "not run)")
    partial: bool = _opt(False, "train on a distilled set its run has not finished (refused otherwise)",
                         action="store_true")


@dataclass(frozen=True)
class TuneOptions:
    config: str = _opt("", "sweep file (tune_configs/NAME.yaml): a base configuration plus the search space",
                       required=True)
    num_samples: int | None = _opt(None, "samples per arch x method (default: the file's)")
    archs: tuple[str, ...] | None = _opt(None, "comma-separated recovery archs to sweep, of the file's or others "
                                               "(default: the file's archs)")
    methods: tuple[str, ...] | None = _opt(None, "comma-separated recovery methods to sweep (default: the file's "
                                                 "methods)")
    max_concurrent: int | None = _opt(None, "trials at once per cell, 0: as many as the resources hold (default: "
                                            "the file's)")
    out: str = _opt("", "sweep directory; rerun the same command to resume", required=True)


@dataclass(frozen=True)
class InspectOptions:
    backbone: tuple[str, ...] = _opt((), "checkpoint(s) to inspect, e.g. one per seed", required=True, nargs="+")
    compare: tuple[str, ...] | None = _opt(None, "a second group, e.g. supervised backbones", nargs="+")
    label: str | None = _opt(None, "name of the --backbone group (default: its method)")
    compare_label: str | None = _opt(None, "name of the --compare group (default: its method)")
    json: str = _opt("", "where to write the statistics", required=True)
    plot: str | None = _opt(None, "PNG: the groups side by side, per layer")


@dataclass(frozen=True)
class ScalingOptions:
    workers: tuple[int, ...] = _opt((1, 2), "comma-separated actor counts; the first is the baseline")
    shards: int = _opt(8, "shards of one batch each (classes_per_batch images) in the job")
    json: str = _opt("", "where to write the result", required=True)


@dataclass(frozen=True)
class RecoverBenchOptions:
    num_classes: int = _opt(100, "classes of the randomly initialised model")
    batch: int = _opt(100, "images per recover batch")
    timed_iterations: int = _opt(20, "recover iterations per timed run")
    threads: int = _opt(0, "torch threads (0: one per core)")
    repeats: int = _opt(3, "timed runs (the median is reported)")
    json: str = _opt("", "where to write the result", required=True)


@dataclass(frozen=True)
class ModelsOptions:
    archs: tuple[str, ...] = _opt(("resnet18", "resnet50", "resnet101"), "comma-separated recovery archs")
    methods: tuple[str, ...] = _opt(("scdd", "sre2l"), "comma-separated: scdd and/or sre2l")
    threads: int = _opt(1, "torch threads of the in-process job")
    work: str = _opt("", "one distill run per cell; rerun the command to resume", required=True)
    json: str = _opt("", "where to write the table", required=True)


@dataclass(frozen=True)
class TableOptions:
    methods: tuple[str, ...] = _opt(TABLE, "comma-separated, random first; a named recipe (scdd-patches) too")
    ipcs: tuple[int, ...] = _opt((1, 10), "comma-separated images per class")
    seeds: tuple[int, ...] = _opt((0, 1, 2), "comma-separated seeds (mean and std over them)")
    full_epochs: int = _opt(30, "epochs of the hard-label student on the whole training split (for HLR)")
    model_seed: int | None = _opt(None, "squeeze the teacher and backbones once with this seed and share them "
                                        "across --seeds (default: one set per seed)")
    hlr_reference: str = _opt("student", "HLR's whole-data hard-label model: student (trained for --full-epochs "
                                         "with the cells' post-train settings) | teacher (the cells' teacher)")
    hlr: bool = _opt(True, "train the hard-label students (HLR)")
    part: str = _opt("1/1", "i/n: run every n-th cell, starting at the i-th (parallel processes; on one CPU "
                            "machine give each OMP_NUM_THREADS=cores/n)")
    work: str = _opt("", "one distill run per cell; rerun the command to resume", required=True)
    json: str = _opt("", "where to write the table", required=True)
    md: str | None = _opt(None, "also write the table as Markdown")
