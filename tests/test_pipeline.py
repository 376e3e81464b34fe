"""End to end through the CLI on the synthetic dataset: outputs, resume, baselines."""
import json
import os

import pandas as pd
import pytest
import torch

from scdd_ray.cli import main
from scdd_ray.report import REQUIRED
from scdd_ray.store.shards import ShardStore


@pytest.fixture(scope="module")
def scdd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "scdd"
    assert main(["-q", "distill", "--dataset", "synthetic", "--out", str(out)]) == 0
    return out


def test_distill_writes_the_documented_output(scdd_run):
    rep = json.loads((scdd_run / "report.json").read_text())
    for k in REQUIRED:
        assert k in rep, k
    assert rep["method"] == "scdd" and rep["num_images"] == 8 and rep["num_classes"] == 4
    assert 0 <= rep["top1"] <= 100 and rep["teacher_top1"] > 50
    assert rep["backbone_method"] == "simclr"
    # one teacher for every method: the supervised model, not the SSL backbone the images came from
    assert rep["teacher_method"] == "supervised" and rep["teacher"] != rep["backbone"]
    assert os.path.dirname(rep["teacher"]) == str(scdd_run / "backbones")
    assert rep["posttrain_workers"] == 1 and rep["posttrain_startup_seconds"] > 0
    assert rep["actor_restarts"] == 0 and rep["shards_repaired"] == []
    assert [h["epoch"] for h in rep["posttrain_history"]][-1] == rep["posttrain_epochs"]
    files = sorted(os.listdir(scdd_run / "distilled"))
    assert "manifest.json" in files and len([f for f in files if f.endswith(".parquet")]) == 2
    df = pd.concat(pd.read_parquet(scdd_run / "distilled" / f) for f in files if f.endswith(".parquet"))
    assert sorted(zip(df.class_id, df.ipc_index)) == [(c, i) for c in range(4) for i in range(2)]
    assert set(df.height) == {16} and set(df.channels) == {3}
    assert sorted(os.listdir(scdd_run / "images")) == [f"new{c:03d}" for c in range(4)]
    assert sorted(os.listdir(scdd_run / "images" / "new002")) == ["class002_id000.png", "class002_id001.png"]
    assert (scdd_run / "grid.png").stat().st_size > 1000


def test_rerun_resumes_without_recomputing(scdd_run, capsys):
    shard_files = {f: os.path.getmtime(scdd_run / "distilled" / f) for f in os.listdir(scdd_run / "distilled")
                   if f.endswith(".parquet")}
    assert main(["-q", "distill", "--dataset", "synthetic", "--out", str(scdd_run)]) == 0
    rep = json.loads((scdd_run / "report.json").read_text())
    assert rep["shards_computed"] == 0 and rep["shards_total"] == 2
    for f, t in shard_files.items():
        assert os.path.getmtime(scdd_run / "distilled" / f) == t
    # both cached models were reused: the SSL backbone and the supervised teacher every method shares
    assert sorted(f.split("-")[0] for f in os.listdir(scdd_run / "backbones") if not f.startswith(".")) == [
        "simclr", "supervised"]


def test_a_truncated_and_a_deleted_shard_are_computed_again_with_the_same_images(scdd_run):
    store = ShardStore(str(scdd_run / "distilled"))
    before, files = store.read(), store.files()
    with open(files[0], "r+b") as f:
        f.truncate(100)
    os.remove(files[1])
    assert main(["-q", "distill", "--dataset", "synthetic", "--out", str(scdd_run)]) == 0
    rep = json.loads((scdd_run / "report.json").read_text())
    assert rep["shards_computed"] == 2 and rep["shards_repaired"] == [os.path.basename(f) for f in files]
    after = store.read()
    assert torch.equal(after[0], before[0]) and (after[1] == before[1]).all() and (after[2] == before[2]).all()
    assert store.verify() == []


@pytest.mark.parametrize("method,backbone", [("random", None), ("sre2l", "supervised")])
def test_baselines_run_on_the_same_budget(tmp_path, method, backbone):
    out = tmp_path / method
    assert main(["-q", "distill", "--dataset", "synthetic", "--method", method, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == method and rep["num_images"] == 8
    assert rep["backbone_method"] == backbone
    assert rep["teacher_method"] == "supervised"


def test_posttrain_standalone_on_a_distill_dir_and_on_an_imagefolder(scdd_run, tmp_path):
    """1 worker storing soft labels on the distill dir, then 2 workers training from them on images/."""
    teacher = next((scdd_run / "backbones").glob("*.pt"))
    first = tmp_path / "distill-dir"
    argv = ["-q", "posttrain", "--distilled", str(scdd_run), "--teacher", str(teacher), "--posttrain-epochs", "2",
            "--store-soft-labels", "--out", str(first)]
    assert main(argv) == 0
    stored = first / "soft_labels"
    assert sorted(os.listdir(stored)) == ["epoch-00000-rank-000.parquet", "epoch-00001-rank-000.parquet",
                                          "soft_labels.json"]
    assert json.loads((stored / "soft_labels.json").read_text())["complete"] is True
    second = tmp_path / "imagefolder"
    argv = ["-q", "posttrain", "--distilled", str(scdd_run / "images"), "--dataset", "synthetic", "--teacher",
            str(teacher), "--posttrain-epochs", "2", "--posttrain-workers", "2", "--soft-labels", str(stored), "--out",
            str(second)]
    assert main(argv) == 0
    a, b = (json.loads((d / "posttrain.json").read_text()) for d in (first, second))
    for res in (a, b):
        assert res["num_images"] == 8 and 0 <= res["top1"] <= 100
        assert res["epochs"] == 2 and res["trained_epochs"] == [1, 2]
    assert (a["num_workers"], b["num_workers"]) == (1, 2)
    assert a["steps"] == b["steps"]  # the same global batch: as many steps with 2 workers as with 1
    assert (first / "student.pt").exists() and (second / "student.pt").exists()


def test_the_hf_export_reads_back_as_a_parquet_dataset(scdd_run):
    from scdd_ray.data import load_split
    from scdd_ray.store.shards import ShardStore

    images, cls, _ = ShardStore(str(scdd_run / "distilled")).read()
    back = load_split("parquet", "train", str(scdd_run / "hf"), 16)
    assert torch.equal(back.images, images) and back.labels.tolist() == cls.tolist()
    assert back.info.class_names == ("class0", "class1", "class2", "class3")
