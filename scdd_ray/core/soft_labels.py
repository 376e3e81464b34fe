"""Stored soft labels as training steps: the columns one step's crops are stored as, and an epoch's steps
rebuilt from them (crop plans and the teacher's top-k), so a post-train can learn without running the teacher."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import StoreError
from ..store.soft_labels import read_soft_labels
from .relabel import MIX_CODES, CropPlan, StepBatch, logits_from_topk, topk_probs

MIX_NAMES = {v: k for k, v in MIX_CODES.items()}


def stored_batches(root: str, epoch: int, num_classes: int, temperature: float,
                   fill: str = "reflection") -> list[StepBatch]:
    """One epoch's batches rebuilt from stored soft labels (crop plans and teacher top-k)."""
    rows = read_soft_labels(root, epoch)
    out = []
    for s in np.unique(rows["step"]):
        sel = np.flatnonzero(rows["step"] == s)
        r = {k: v[sel] for k, v in rows.items()}
        if not np.array_equal(r["slot"], np.arange(len(sel))):
            raise StoreError(f"{root}: epoch {epoch + 1} step {int(s)} lacks some crops")
        boxes = torch.from_numpy(np.stack([r["box_w"], r["box_h"], r["box_cx"], r["box_cy"]], 1).astype(np.float32))
        plan = CropPlan(boxes, torch.from_numpy(r["flip"].astype(bool)), MIX_NAMES[int(r["mix"][0])],
                        torch.from_numpy(r["partner"].astype(np.int64)),
                        tuple(int(r[c][0]) for c in ("cut_y0", "cut_y1", "cut_x0", "cut_x1")), float(r["lam"][0]),
                        fill)
        targets = logits_from_topk(torch.from_numpy(r["topk_prob"].astype(np.float32)),
                                   torch.from_numpy(r["topk_index"].astype(np.int64)), num_classes, temperature)
        out.append(StepBatch(torch.from_numpy(r["image"].astype(np.int64)), plan, targets))
    return out


def soft_label_rows(epoch: int, step: int, sb: StepBatch, rows: torch.Tensor, target_logits: torch.Tensor,
                    temperature: float, k: int) -> dict:
    """Stored-soft-label columns for this worker's rows of one step."""
    v, i = topk_probs(target_logits, temperature, k)
    return _columns(epoch, step, sb, rows, v.cpu(), i.cpu())


class SoftLabelRecorder:
    """Stored-soft-label columns of one epoch, step by step: the teacher's top-k stays on the device until
    `columns` reads every step's back at once (one host sync an epoch, not one a step)."""

    def __init__(self, temperature: float, k: int):
        self.temperature, self.k = temperature, k
        self._steps: list = []

    def record(self, epoch: int, step: int, sb: StepBatch, rows: torch.Tensor, target_logits: torch.Tensor) -> None:
        v, i = topk_probs(target_logits.detach(), self.temperature, self.k)
        self._steps.append((epoch, step, sb, rows, v, i))

    def columns(self) -> dict:
        """The recorded steps' columns, concatenated; the record starts over."""
        steps, self._steps = self._steps, []
        sizes = [len(s[4]) for s in steps]
        values = torch.cat([s[4] for s in steps]).cpu().split(sizes)
        indices = torch.cat([s[5] for s in steps]).cpu().split(sizes)
        cols = [_columns(e, s, sb, rows, v, i) for (e, s, sb, rows, _, _), v, i in zip(steps, values, indices)]
        return {c: np.concatenate([r[c] for r in cols]) for c in cols[0]}


def _columns(epoch: int, step: int, sb: StepBatch, rows: torch.Tensor, v: torch.Tensor, i: torch.Tensor) -> dict:
    p = sb.plan
    n = len(rows)
    partner = p.partner[rows] if p.partner is not None else rows
    b = p.boxes[rows]
    full = lambda val, dt: np.full(n, val, dt)  # noqa: E731
    return {"epoch": full(epoch, np.int32), "step": full(step, np.int32), "slot": rows.numpy().astype(np.int32),
            "image": sb.idx[rows].numpy().astype(np.int32),
            "box_w": b[:, 0].numpy(), "box_h": b[:, 1].numpy(), "box_cx": b[:, 2].numpy(), "box_cy": b[:, 3].numpy(),
            "flip": p.flip[rows].numpy(), "mix": full(MIX_CODES[p.mix], np.int8),
            "partner": partner.numpy().astype(np.int32),
            "cut_y0": full(p.box[0], np.int16), "cut_y1": full(p.box[1], np.int16),
            "cut_x0": full(p.box[2], np.int16), "cut_x1": full(p.box[3], np.int16),
            "lam": full(p.lam, np.float32),
            "topk_index": i.numpy().astype(np.int16), "topk_prob": v.numpy().astype(np.float16)}
