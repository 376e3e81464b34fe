"""report.json: the record every distill run writes, with the fields users and tables rely on."""
from __future__ import annotations

from .store.atomic import atomic_write_json

REQUIRED = ("method", "dataset", "arch", "width", "ipc", "num_classes", "num_images", "top1", "teacher_top1",
            "recover_seconds", "posttrain_seconds", "num_workers", "seed")


def write_report(path: str, report: dict) -> None:
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise ValueError(f"report lacks {', '.join(missing)}")
    atomic_write_json(path, report)
