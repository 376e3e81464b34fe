"""`scdd-ray bench models`: one full distill per (recovery arch, method), tabulated and resumable."""
import json
import os

from scdd_ray.cli import main

TINY = ["--dataset", "synthetic", "--width", "0.125", "--ipc", "1", "--iterations", "3", "--squeeze-epochs", "1",
        "--posttrain-epochs", "1"]


def test_bench_models_runs_every_cell_and_resumes(ray_session, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "models.json"
    argv = ["-q", "bench", "models", "--archs", "resnet18", "--methods", "scdd,sre2l", *TINY,
            "--work", str(work), "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["results"]}
    assert set(rows) == {"scdd", "sre2l"} and res["dataset"] == "synthetic"
    # Each method recovers from its own backbone: SSL for scdd, supervised for sre2l.
    assert rows["scdd"]["backbone_method"] == "simclr" and rows["sre2l"]["backbone_method"] == "supervised"
    for r in rows.values():
        assert r["arch"] == "resnet18" and r["iterations"] == 3 and r["num_images"] == 4  # 4 classes x IPC 1
        assert abs(r["recover_img_iters_per_s"] - 4 * 3 / r["recover_seconds"]) < 0.01 * r["recover_img_iters_per_s"]
        assert 0 <= r["top1"] <= 100 and 0 <= r["teacher_top1"] <= 100 and r["squeeze_seconds"] > 0
        assert r["step_img_iters_per_s"] > 0 and "_recover" not in r
        cell = (f"synthetic-resnet18-w0.125-{r['method']}-ipc1-seed0-posttrain_epochs-1-recover_iterations-3"
                "-squeeze_epochs-1")
        report = json.loads((work / cell / "report.json").read_text())
        assert report["top1"] == r["top1"] and report["posttrain_epochs"] == 1
    # A rerun reads the finished cells instead of recomputing them.
    stamps = {p: os.stat(p).st_mtime_ns for p in work.glob("*/report.json")}
    assert main(argv) == 0
    assert {p: os.stat(p).st_mtime_ns for p in work.glob("*/report.json")} == stamps
    # Only the step timing is measured afresh by each invocation.
    again = json.loads(out.read_text())["results"]
    assert [{k: v for k, v in r.items() if k != "step_img_iters_per_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "step_img_iters_per_s"} for r in res["results"]]
    assert all(r["step_img_iters_per_s"] > 0 for r in again)
    # Another recover setting makes new cells that reuse the squeezed backbones instead of training them again.
    assert main([*argv[:-4], "--bn-normalize", "mean", "--work", str(work), "--json", str(out)]) == 0
    mean_rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    for m in ("scdd", "sre2l"):
        new = json.loads(next(work.glob(f"*-{m}-*bn_normalize-mean*/report.json")).read_text())
        old = json.loads(next(p for p in stamps if f"-{m}-" in str(p)).read_text())
        assert new["backbone"] == old["backbone"] and new["config"]["recover"]["bn_normalize"] == "mean"
        assert mean_rows[m]["teacher_top1"] == rows[m]["teacher_top1"]
    # the cells share work/models: the SSL backbone, and one supervised model that is sre2l's backbone and the
    # teacher of both methods
    assert sorted(p.name.split("-")[0] for p in (work / "models").glob("*.pt")) == ["simclr", "supervised"]
    assert not list(work.glob("*/backbones/*.pt"))
    assert rows["scdd"]["teacher"] == rows["sre2l"]["teacher"]


def test_bench_models_rejects_bad_flags_before_any_work(tmp_path, capsys):
    work = tmp_path / "work"
    for flags, flag in ((["--methods", "random"], "--methods"), (["--archs", "resnet9"], "--archs"),
                        (["--ipc", "0"], "--ipc"), (["--iterations", "0"], "--iterations")):
        assert main(["bench", "models", *flags, "--work", str(work), "--json", str(tmp_path / "o.json")]) == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err
    assert not work.exists()
