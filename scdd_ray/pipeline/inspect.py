"""The `inspect-bn` command: how much each BN layer's running statistics vary across
channels, for one or two groups of backbones (e.g. SSL vs supervised, one per seed)."""
from __future__ import annotations

from ..backbones import load_any_backbone
from ..core.bn import aggregate_summaries, bn_statistics, summarize_bn
from ..errors import ConfigError
from ..plots import plot_bn
from ..store.atomic import atomic_write_json


def inspect_group(field: str, paths: list[str], label: str | None) -> dict:
    """Per-layer statistics and summaries of each checkpoint of one group (one architecture)."""
    runs, methods = [], []
    for p in paths:
        model, method = load_any_backbone(p, field)
        rows = bn_statistics(model)
        if runs and len(rows) != len(runs[0]["layers"]):
            raise ConfigError(field, f"{p} has {len(rows)} BN layers, {paths[0]} has {len(runs[0]['layers'])}; "
                                     "a group must share one architecture")
        runs.append({"path": p, "method": method, "layers": rows, "summary": summarize_bn(rows)})
        methods.append(method)
    return {"label": label or "/".join(sorted(set(methods))), "field": field, "checkpoints": runs,
            "summary": aggregate_summaries([r["summary"] for r in runs])}


def inspect_bn(groups: list[tuple[str, list[str], str | None]], json_path: str, plot_path: str | None,
               provenance: dict | None = None) -> list[dict]:
    """groups: (field, checkpoint paths, label); writes the JSON (led by `provenance`: command, commit,
    machine) and the plot; returns the groups."""
    out = [inspect_group(field, paths, label) for field, paths, label in groups if paths]
    if len(out) == 2 and len(out[0]["checkpoints"][0]["layers"]) != len(out[1]["checkpoints"][0]["layers"]):
        raise ConfigError(out[1]["field"], "the compared backbones have a different number of BN layers than "
                                           f"`{out[0]['field']}`")
    atomic_write_json(json_path, {**(provenance or {}), "groups": out})
    if plot_path:
        plot_bn(plot_path, [{"label": g["label"], "runs": [r["layers"] for r in g["checkpoints"]]} for g in out])
    return out
