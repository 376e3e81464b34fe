"""`bench table`: one teacher file for every method, IOR and HLR columns, resume cell by cell."""
import json
import os

import pytest
import torch
from test_cli_errors import run_err

from scdd_ray.cli import main


@pytest.mark.slow
def test_table_shares_one_teacher_and_carries_ior_and_hlr(tmp_path, capsys):
    work, out = tmp_path / "w", tmp_path / "t.json"
    argv = ["-q", "bench", "table", "--dataset", "synthetic", "--methods", "random,scdd", "--ipcs", "1",
            "--seeds", "0", "--full-epochs", "3", "--work", str(work), "--json", str(out), "--md",
            str(tmp_path / "t.md")]
    assert main(argv) == 0
    table = json.loads(out.read_text())
    reports = {m: json.loads((work / "cells" / f"synthetic-{m}-ipc1-seed0" / "report.json").read_text())
               for m in ("random", "scdd")}
    # the same teacher FILE relabels the random subset and the distilled set
    assert reports["random"]["teacher"] == reports["scdd"]["teacher"]
    assert reports["random"]["teacher_method"] == "supervised" and reports["scdd"]["backbone_method"] == "simclr"
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["random"]["ior"]["mean"] == 0.0 and rows["scdd"]["evaluated_on"] == "test"
    assert rows["scdd"]["ior"]["mean"] == pytest.approx(reports["scdd"]["top1"] - reports["random"]["top1"])
    full = table["full_hard_top1"]["0"]
    hard = json.loads((work / "cells" / "synthetic-scdd-ipc1-seed0" / "hard.json").read_text())["hard_top1"]
    assert rows["scdd"]["hlr"]["mean"] == pytest.approx(full - hard)
    assert "| IOR | HLR |" in (tmp_path / "t.md").read_text()
    # a rerun reads every cell back: nothing is recomputed, the table is the same
    stamps = {p: os.path.getmtime(p) for p in work.rglob("*.json")}
    assert main(argv) == 0
    assert json.loads(out.read_text())["rows"] == table["rows"]
    assert all(os.path.getmtime(p) == t for p, t in stamps.items())


def test_table_flags_are_checked_before_any_work(tmp_path, capsys):
    base = ["bench", "table", "--dataset", "synthetic", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "j")]
    assert "--methods" in run_err(capsys, base + ["--methods", "random,dm"])
    assert "--ipcs" in run_err(capsys, base + ["--ipcs", "0,1"])
    assert "--part" in run_err(capsys, base + ["--part", "3/2"])
    assert "--iterations" in run_err(capsys, base + ["--iterations", "0"])
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_holdout_tables_never_read_test_and_share_random_cells(tmp_path, capsys, monkeypatch):
    """Lever tables choose settings on the validation share: the test split is never loaded, the models
    are squeezed on train less that share, and tables that differ only in recover settings share their
    random cells; HLR can take the seed's teacher as its whole-data hard-label model."""
    import scdd_ray.data as data

    asked = []
    real_load = data.load_split
    monkeypatch.setattr(data, "load_split", lambda name, split, *a, **k: asked.append(split) or
                        real_load(name, split, *a, **k))
    work = tmp_path / "w"
    base = ["-q", "bench", "table", "--dataset", "synthetic", "--methods", "random,scdd", "--ipcs", "1",
            "--seeds", "0", "--holdout", "--hlr-reference", "teacher", "--work", str(work)]
    assert main(base + ["--init", "real", "--json", str(tmp_path / "a.json")]) == 0
    random_cell = work / "cells" / "synthetic-random-ipc1-seed0-holdout-True"
    stamp = os.path.getmtime(random_cell / "report.json")
    assert main(base + ["--init", "noise", "--json", str(tmp_path / "b.json")]) == 0
    assert os.path.getmtime(random_cell / "report.json") == stamp  # the random subset was not recomputed
    assert set(asked) == {"train-noval", "val"}
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert sorted(p.name for p in (work / "models").glob("*.pt")) == [
        "simclr-resnet18-w0.125-s16-e6-seed0-train-noval.pt", "supervised-resnet18-w0.125-s16-e6-seed0-train-noval.pt"]
    scdd = {t: json.loads((work / "cells" / f"synthetic-scdd-ipc1-seed0-holdout-True-recover_init-{t}"
                                / "report.json").read_text()) for t in ("real", "noise")}
    assert all(r["evaluated_on"] == "val" for r in scdd.values())
    rows = {r["method"]: r for r in b["rows"]}
    assert rows["scdd"]["top1"]["mean"] == scdd["noise"]["top1"] and rows["scdd"]["evaluated_on"] == "val"
    assert {r["method"]: r for r in a["rows"]}["scdd"]["top1"]["mean"] == scdd["real"]["top1"]
    hard = json.loads((work / "cells" / "synthetic-scdd-ipc1-seed0-holdout-True-recover_init-noise" / "hard.json")
                      .read_text())["hard_top1"]
    assert rows["scdd"]["hlr"]["mean"] == pytest.approx(scdd["noise"]["teacher_top1"] - hard)
    assert b["hlr_reference"] == "teacher" and not (work / "full").exists()


def test_shared_models_seed_names_cells_apart(tmp_path):
    """With --model-seed the cells of other seeds name the models they share; the model seed's own cells
    are the same runs as in a per-seed table, and random cells ignore recover settings."""
    from scdd_ray.bench.table import TableSpec, cell_dir

    per_seed = TableSpec("synthetic", str(tmp_path))
    shared = TableSpec("synthetic", str(tmp_path), model_seed=0, overrides={"recover.init": "real", "width": 0.5})
    assert (os.path.basename(cell_dir(shared, "scdd", 10, 1))
            == "synthetic-scdd-ipc10-seed1-models0-recover_init-real-width-0.5")
    assert os.path.basename(cell_dir(shared, "random", 10, 1)) == "synthetic-random-ipc10-seed1-models0-width-0.5"
    assert cell_dir(per_seed, "scdd", 1, 0) == cell_dir(TableSpec("synthetic", str(tmp_path), model_seed=0),
                                                         "scdd", 1, 0)
    assert shared.config("random", 1, 1, "o").recover.init == "noise"
    assert shared.config("scdd", 1, 1, "o").recover.init == "real"


@pytest.mark.slow
def test_post_train_variants_share_the_cells_distilled_sets(tmp_path, capsys, monkeypatch):
    """A table that differs only in post-training (or the teacher) distills nothing again: its cells resume
    the same runs, whose shards are kept, and write reports of their own."""
    work = tmp_path / "w"
    base = ["-q", "bench", "table", "--dataset", "synthetic", "--methods", "random,scdd", "--ipcs", "1",
            "--seeds", "0", "--no-hlr", "--work", str(work)]
    assert main(base + ["--json", str(tmp_path / "a.json")]) == 0
    cell = work / "cells" / "synthetic-scdd-ipc1-seed0"
    shards = {p: os.path.getmtime(p) for p in (cell / "distilled").glob("*.parquet")}
    assert main(base + ["--posttrain-epochs", "3", "--teacher-bn", "train", "--json", str(tmp_path / "b.json")]) == 0
    assert {p: os.path.getmtime(p) for p in (cell / "distilled").glob("*.parquet")} == shards  # not recovered again
    variant = json.loads((cell / "report-table-posttrain_epochs-3-posttrain_teacher_bn-train.json").read_text())
    assert variant["posttrain_epochs"] == 3 and variant["config"]["posttrain"]["teacher_bn"] == "train"
    rows = {r["method"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows["scdd"]["top1"]["values"] == [variant["top1"]]
    assert len(list(work.glob("cells/*"))) == 2  # the two tables' cells are the same two runs
    # the first table reads its own reports again, not the latest post-train's
    assert main(base + ["--json", str(tmp_path / "a2.json")]) == 0
    assert json.loads((tmp_path / "a2.json").read_text())["rows"] == json.loads((tmp_path / "a.json").read_text())["rows"]
    assert json.loads((cell / "report.json").read_text())["posttrain_epochs"] == 3  # the run's latest
    # a preset whose post-train default changed keeps the cells' names, but their reports are stale: the
    # cells post-train again under the new default (the distilled sets are kept); nothing old is read back
    import dataclasses

    import scdd_ray.bench.table as table
    real = table.build_distill_config
    monkeypatch.setattr(table, "build_distill_config", lambda dataset, out, given: dataclasses.replace(
        cfg := real(dataset, out, given), posttrain=dataclasses.replace(cfg.posttrain, epochs=2)))
    assert main(base + ["--json", str(tmp_path / "a3.json")]) == 0
    assert {p: os.path.getmtime(p) for p in (cell / "distilled").glob("*.parquet")} == shards
    for m in ("random", "scdd"):
        report = json.loads((work / "cells" / f"synthetic-{m}-ipc1-seed0" / "report-table.json").read_text())
        assert report["posttrain_epochs"] == 2 and report["cell_settings"]["posttrain"]["epochs"] == 2
    rows = {r["method"]: r for r in json.loads((tmp_path / "a3.json").read_text())["rows"]}
    assert rows["scdd"]["top1"]["values"] == [report["top1"]]


def test_a_cells_result_is_kept_only_under_the_settings_it_was_made_under(tmp_path):
    """Cells are named by their overrides; a result is read back only while the resolved settings (presets
    included) match those it was written under, whichever benchmark wrote it."""
    import dataclasses

    from scdd_ray.bench.cells import read_current, settings_key
    from scdd_ray.config import build_distill_config
    from scdd_ray.store.atomic import atomic_write_json

    cfg = build_distill_config("synthetic", str(tmp_path / "o"), {"ipc": 1})
    path = str(tmp_path / "report.json")
    assert read_current(path, settings_key(cfg)) is None
    atomic_write_json(path, {"top1": 12.5, "cell_settings": settings_key(cfg)})
    assert read_current(path, settings_key(cfg))["top1"] == 12.5
    same = build_distill_config("synthetic", str(tmp_path / "o"), {"ipc": 1, "num_workers": 2})  # placement
    assert read_current(path, settings_key(same))["top1"] == 12.5
    for changed in (dataclasses.replace(cfg, posttrain=dataclasses.replace(cfg.posttrain, cosine_period=3.0)),
                    dataclasses.replace(cfg, recover=dataclasses.replace(cfg.recover, iterations=7))):
        assert read_current(path, settings_key(changed)) is None
    atomic_write_json(path, {"top1": 12.5})  # written before results carried their settings
    assert read_current(path, settings_key(cfg)) is None


def test_a_cells_result_is_not_read_back_when_its_teacher_file_holds_other_weights(tmp_path):
    """The same teacher path with other contents (squeezed again by newer code, say) is another cell."""
    from scdd_ray.bench.cells import read_current, settings_key
    from scdd_ray.config import build_distill_config
    from scdd_ray.models.checkpoint import save_checkpoint
    from scdd_ray.models.factory import create_model
    from scdd_ray.store.atomic import atomic_write_json

    teacher = str(tmp_path / "t.pt")

    def squeeze(seed):
        torch.manual_seed(seed)
        save_checkpoint(teacher, create_model("resnet18", 4, 0.125), arch="resnet18", width=0.125, num_classes=4,
                        image_size=16, small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3, method="supervised")

    cfg = build_distill_config("synthetic", str(tmp_path / "o"), {"ipc": 1, "method": "random", "teacher": teacher})
    before = settings_key(cfg)
    assert before["models"] == {"backbone": None, "teachers": [None]}  # not there yet: the run makes it
    squeeze(0)
    path = str(tmp_path / "report.json")
    atomic_write_json(path, {"top1": 12.5, "cell_settings": settings_key(cfg)})
    assert read_current(path, before) is None and read_current(path, settings_key(cfg))["top1"] == 12.5
    squeeze(1)  # the same file name, other weights
    assert read_current(path, settings_key(cfg)) is None
