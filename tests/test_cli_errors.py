"""Bad input: one `scdd-ray: error:` line, exit code 2, nothing written."""
import json
import os

import pytest
import torch
from helpers import make_cifar

from scdd_ray.cli import main
from scdd_ray.models.checkpoint import save_checkpoint
from scdd_ray.models.factory import create_model


def run_err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("scdd-ray: error: "), err
    return err[0]


@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "mnist"], "--dataset"),
    (["--dataset", "digits", "--arch", "vgg"], "--arch"),
    (["--dataset", "digits", "--ipc", "0"], "--ipc"),
    (["--dataset", "digits", "--width", "0"], "--width"),
    (["--dataset", "digits", "--width", "-1"], "--width"),
    (["--dataset", "digits", "--method", "dm"], "--method"),
    (["--dataset", "digits", "--bn-weights", "1,-1"], "--bn-weights"),
    (["--dataset", "digits", "--init", "zeros"], "--init"),
    (["--dataset", "digits", "--iterations", "0"], "--iterations"),
    (["--dataset", "digits", "--recover-crop-scale", "0.5"], "--recover-crop-scale"),
    (["--dataset", "digits", "--ipc", "abc"], "--ipc"),
    (["--dataset", "cifar100"], "--data-dir"),
    (["--dataset", "digits", "--num-gpus", "8"], "--num-gpus"),
    (["--dataset", "digits", "--num-workers", "0"], "--num-workers"),
    (["--dataset", "digits", "--address", "127.0.0.1:1"], "--address"),
])
def test_bad_distill_input(tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    line = run_err(capsys, ["distill", "--out", str(out)] + extra)
    assert needle in line
    assert not out.exists()


def test_cifar_dir_without_expected_files(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    out = tmp_path / "run"
    line = run_err(capsys, ["distill", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert "cifar-10-batches-py" in line and "data_batch_1" in line
    assert not out.exists()
    line = run_err(capsys, ["distill", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nothere"), "--out", str(out)])
    assert "does not exist" in line


def test_out_holding_a_different_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = {"fingerprint": "0000", "config": {"dataset": "digits", "ipc": 3}}
    (out / "run.json").write_text(json.dumps(cfg))
    line = run_err(capsys, ["distill", "--dataset", "digits", "--out", str(out)])
    assert "different run" in line and "ipc was 3" in line
    assert sorted(os.listdir(out)) == ["run.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    line = run_err(capsys, ["distill", "--dataset", "digits", "--out", str(tmp_path / "other")])
    assert "not empty" in line


def test_backbone_checkpoint_errors(tmp_path, capsys):
    p = tmp_path / "r50.pt"
    m = create_model("resnet50", 10, width=0.0625)
    save_checkpoint(str(p), m, arch="resnet50", width=0.0625, num_classes=10, image_size=32, small_input=True,
                    mean=(0.3,) * 3, std=(0.3,) * 3, method="simclr")
    out = tmp_path / "run"
    line = run_err(capsys, ["distill", "--dataset", "digits", "--backbone", str(p), "--out", str(out)])
    assert "--backbone" in line and "resnet50" in line and "--arch resnet18" in line
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    line = run_err(capsys, ["distill", "--dataset", "digits", "--backbone", str(corrupt), "--out", str(out)])
    assert "not a readable torch file" in line
    assert not out.exists()


def test_usage_errors_are_one_line(capsys):
    run_err(capsys, ["distill", "--dataset", "digits"])  # --out missing
    run_err(capsys, ["frobnicate"])


def test_squeeze_errors(tmp_path, capsys):
    line = run_err(capsys, ["squeeze", "--dataset", "digits", "--squeeze-method", "byol", "--out", str(tmp_path / "b.pt")])
    assert "--squeeze-method" in line
    make_cifar(tmp_path / "c", "cifar10")
    line = run_err(capsys, ["squeeze", "--dataset", "cifar100", "--data-dir", str(tmp_path / "c"), "--out", "x.pt"])
    assert "cifar-100-python" in line
    if not torch.cuda.is_available():  # a GPU job never falls back to the CPU silently
        line = run_err(capsys, ["squeeze", "--dataset", "synthetic", "--num-gpus", "1", "--out", str(tmp_path / "g.pt")])
        assert line.startswith("scdd-ray: error: --num-gpus: ") and "sees no CUDA device" in line
        assert not (tmp_path / "g.pt").exists()


def test_manifest_of_another_configuration_is_refused_before_writing(tmp_path, capsys):
    from scdd_ray.config import build_distill_config

    out = tmp_path / "run"
    cfg = build_distill_config("synthetic", str(out), {})
    (out / "distilled").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}))
    manifest = {"format": "scdd-ray-shards/1", "fingerprint": "other", "shards": {}}
    (out / "distilled" / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(str(p) for p in out.rglob("*"))
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--out", str(out)])
    assert "different configuration" in line
    assert sorted(str(p) for p in out.rglob("*")) == before


# --- posttrain ---------------------------------------------------------------------

@pytest.fixture
def distilled(tmp_path):
    """A tiny distilled set for the synthetic dataset (4 classes, 16x16) and a matching teacher."""
    import torch

    from scdd_ray.store.shards import ShardStore

    store = ShardStore(str(tmp_path / "set"))
    store.open("fp")
    store.write_shard("a", [0, 1, 2, 3], [0, 0, 0, 0], torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    teacher = tmp_path / "t4.pt"
    save_checkpoint(str(teacher), create_model("resnet18", 4, width=0.125), arch="resnet18", width=0.125,
                    num_classes=4, image_size=16, small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3,
                    method="supervised")
    return tmp_path / "set", teacher


def _posttrain(src, teacher, out, *extra):
    return ["posttrain", "--distilled", str(src), "--teacher", str(teacher), "--dataset", "synthetic",
            "--out", str(out), *extra]


def test_posttrain_on_a_directory_without_shards(tmp_path, capsys, distilled):
    _, teacher = distilled
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    line = run_err(capsys, _posttrain(tmp_path / "empty", teacher, out))
    assert "--distilled" in line and "no distilled images" in line
    none = tmp_path / "none"
    none.mkdir()
    (none / "manifest.json").write_text(json.dumps({"format": "scdd-ray-shards/1", "fingerprint": "x", "shards": {}}))
    line = run_err(capsys, _posttrain(none, teacher, out))
    assert "--distilled" in line and "no finished shards" in line
    line = run_err(capsys, _posttrain(tmp_path / "missing", teacher, out))
    assert "not a directory" in line
    assert not out.exists()


def test_posttrain_teacher_with_another_class_count(tmp_path, capsys, distilled):
    src, _ = distilled
    t10 = tmp_path / "t10.pt"
    save_checkpoint(str(t10), create_model("resnet18", 10, width=0.125), arch="resnet18", width=0.125,
                    num_classes=10, image_size=16, small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3,
                    method="supervised")
    out = tmp_path / "out"
    line = run_err(capsys, _posttrain(src, t10, out))
    assert "--teacher" in line and "10 classes" in line and "has 4" in line
    assert not out.exists()


def test_more_workers_than_the_cluster_can_place(ray_session, tmp_path, capsys, distilled):
    src, teacher = distilled
    out = tmp_path / "out"
    line = run_err(capsys, _posttrain(src, teacher, out, "--posttrain-workers", "3"))  # the session has 2 CPUs
    assert "--posttrain-workers" in line and "3 workers need 3 CPUs" in line and "has 2" in line
    line = run_err(capsys, _posttrain(src, teacher, out, "--posttrain-workers", "2", "--posttrain-batch-size", "1"))
    assert "--posttrain-workers" in line and "cannot share a batch of 1" in line
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--posttrain-workers", "3", "--out", str(out)])
    assert "--posttrain-workers" in line and "has 2" in line
    assert not out.exists()


def test_stored_soft_labels_that_do_not_fit(tmp_path, capsys, distilled):
    src, teacher = distilled
    out = tmp_path / "out"
    line = run_err(capsys, _posttrain(src, teacher, out, "--soft-labels", str(tmp_path)))
    assert "--soft-labels" in line and "holds no stored soft labels" in line
    meta = {"format": "scdd-ray-soft-labels/1", "complete": True, "images_digest": "other", "num_classes": 4,
            "temperature": 4.0, "batch_size": 4, "epochs": 2}
    (tmp_path / "soft_labels.json").write_text(json.dumps(meta))
    line = run_err(capsys, _posttrain(src, teacher, out, "--soft-labels", str(tmp_path)))
    assert "other images" in line
    assert not out.exists()
