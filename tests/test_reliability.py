"""Issue 15, reliability and security: planted pickles never run, damage at rest is found (and repaired
on resume), one writer per output directory, OS errors are one line, outputs follow the umask."""
import json
import os
import pathlib
import re
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_cli_errors import run_err

import scdd_ray
from scdd_ray.errors import CheckpointError, StoreError
from scdd_ray.models.checkpoint import save_checkpoint
from scdd_ray.models.factory import create_model
from scdd_ray.pipeline.outdir import LOCK_FILE, lock_out_dir
from scdd_ray.store.atomic import atomic_write_bytes
from scdd_ray.store.shards import ShardStore

REPO = os.path.dirname(os.path.dirname(scdd_ray.__file__))  # the code under test, for child processes
ENV = {**os.environ, "PYTHONPATH": REPO}


def _imgs(n, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 4-class teacher for the synthetic dataset (16x16)."""
    p = tmp_path_factory.mktemp("teacher") / "t4.pt"
    save_checkpoint(str(p), create_model("resnet18", 4, width=0.0625), arch="resnet18", width=0.0625, num_classes=4,
                    image_size=16, small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3, method="supervised")
    return p


def _posttrain(src, teacher, out):
    return ["posttrain", "--distilled", str(src), "--teacher", str(teacher), "--dataset", "synthetic",
            "--out", str(out)]


# --- 1. more workers than the cluster can place ----------------------------------------------------

def test_more_synthesis_workers_than_the_cluster_has_cpus_is_refused_at_once(ray_session, tmp_path, capsys):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--num-workers", "3", "--out", str(out)])
    assert "--num-workers" in line and "3 workers need 3 CPUs but the Ray cluster has 2" in line  # the session's 2
    assert time.perf_counter() - t0 < 60 and not out.exists()


# --- 2. a pickle planted in an output directory never runs ----------------------------------------

class Planted:
    """Unpickles to a call of Path.touch(marker): stands for any code a planted pickle could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def plant(path, marker):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"epoch": 2, "step": 4, "history": [], "payload": Planted(marker)}, str(path))


def test_a_planted_posttrain_state_is_refused_and_never_runs(tmp_path):
    import ray.train

    from scdd_ray.dist.posttrain import STATE_FILE, checkpoint_state, finished_state

    marker = tmp_path / "code-ran"
    state = tmp_path / "posttrain" / "student-abc" / "epoch-00002" / STATE_FILE
    plant(state, marker)
    # a rerun first asks whether the post-train already finished...
    assert finished_state(str(tmp_path / "posttrain"), "student-abc", 2) is None
    # ...then every Ray Train worker resumes from the checkpoint Ray hands it
    with pytest.raises(CheckpointError, match=re.escape(str(state)) + " is not a training state scdd-ray wrote"):
        checkpoint_state(ray.train.Checkpoint.from_directory(str(state.parent)))
    assert not marker.exists()
    torch.load(str(state), weights_only=False)  # the payload is live: a plain torch.load runs it
    assert marker.exists()


def test_a_planted_tune_trial_state_is_refused_and_never_runs(tmp_path):
    from ray import tune
    from test_tune import TINY

    from scdd_ray.dist.tune import STATE_FILE, summarize
    from scdd_ray.tune_config import load_tune_config

    cfg = load_tune_config(TINY)
    marker, trial = tmp_path / "code-ran", tmp_path / "trial"
    plant(trial / STATE_FILE, marker)
    result = SimpleNamespace(metrics={"val_top1": 50.0, "epoch": cfg.base.posttrain.epochs}, path=str(trial),
                             config={"bn_coef": 0.1, "first_multiplier": 1},
                             checkpoint=tune.Checkpoint.from_directory(str(trial)))
    cell = ("resnet18", "scdd")
    models = {cell: (cfg.cell(*cell, str(tmp_path / "sweep")), SimpleNamespace(backbone_path=None, teacher_path=None))}
    with pytest.raises(CheckpointError, match=STATE_FILE):
        summarize({cell: [result]}, models, cfg, str(tmp_path / "sweep"), 1.0)
    assert not marker.exists() and not (tmp_path / "sweep" / "best.json").exists()


# --- 3. damage at rest --------------------------------------------------------------------------------

def _damage(files):
    """Truncate the first file, flip one byte of the second, delete the third."""
    data = open(files[0], "rb").read()
    open(files[0], "wb").write(data[: len(data) // 2])
    data = bytearray(open(files[1], "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(files[1], "wb").write(bytes(data))
    os.remove(files[2])


def test_damaged_shards_are_found_dropped_and_written_again(tmp_path):
    st = ShardStore(str(tmp_path / "d"))
    st.open("fp")
    for i in range(4):
        st.write_shard(f"s{i}", [0, 1], [i, i], _imgs(2, i))
    before = st.read()
    files = st.files()
    _damage(files)
    with pytest.raises(StoreError, match=re.escape(files[0]) + r" is damaged \(\d+ bytes, the manifest says \d+\)"):
        st.read()
    dropped = st.verify(repair=True)
    assert [p for p, _ in dropped] == files[:3]
    assert "sha256" in dropped[1][1] and dropped[2][1] == "missing"
    assert st.done() == {"s3"}
    for i in range(3):
        assert st.write_shard(f"s{i}", [0, 1], [i, i], _imgs(2, i))
    after = st.read()
    assert all(torch.equal(a, b) if torch.is_tensor(a) else (a == b).all() for a, b in zip(before, after))
    assert st.verify() == []


@pytest.mark.parametrize("manifest", [
    "[]", "null", '{"format": "scdd-ray-shards/1", "fingerprint": "FP"}',
    '{"format": "scdd-ray-shards/1", "fingerprint": "FP", "shards": []}',
    '{"format": "scdd-ray-shards/1", "fingerprint": "FP", "shards": {"a": {"file": "../../run.json", "rows": 1}}}',
])
def test_a_manifest_of_the_wrong_shape_is_one_line(tmp_path, capsys, teacher, manifest):
    from scdd_ray.config import build_distill_config

    out = tmp_path / "run"
    cfg = build_distill_config("synthetic", str(out), {})
    (out / "distilled").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}))
    (out / "distilled" / "manifest.json").write_text(manifest.replace("FP", cfg.fingerprint()))
    before = sorted(str(p) for p in out.rglob("*"))
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--out", str(out)])
    assert "--out" in line and "manifest.json" in line
    assert sorted(str(p) for p in out.rglob("*")) == before
    line = run_err(capsys, _posttrain(out / "distilled", teacher, tmp_path / "pt"))
    assert "--distilled" in line and "manifest.json" in line
    assert not (tmp_path / "pt").exists()


def test_posttrain_refuses_a_damaged_set_naming_the_file(tmp_path, capsys, teacher):
    st = ShardStore(str(tmp_path / "set"))
    st.open("fp")
    for i in range(3):
        st.write_shard(f"s{i}", [0, 1, 2, 3], [i] * 4, _imgs(4, i, size=16))
    files = st.files()
    _damage(files)
    line = run_err(capsys, _posttrain(tmp_path / "set", teacher, tmp_path / "pt"))
    assert "--distilled" in line and files[0] in line and "is damaged" in line
    os.remove(tmp_path / "set" / "manifest.json")  # bare Parquet files: no digests, still one line
    line = run_err(capsys, _posttrain(tmp_path / "set", teacher, tmp_path / "pt"))
    assert "--distilled" in line and files[0] in line and "not a readable shard" in line
    assert not (tmp_path / "pt").exists()


def test_posttrain_on_a_folder_of_mixed_size_images_is_one_line(tmp_path, capsys, teacher):
    for c, size in ((0, 16), (1, 16), (2, 12)):
        d = tmp_path / "images" / f"new{c:03d}"
        d.mkdir(parents=True)
        Image.fromarray(_imgs(1, c, size)[0].permute(1, 2, 0).numpy()).save(d / f"class{c:03d}_id000.png")
    line = run_err(capsys, _posttrain(tmp_path / "images", teacher, tmp_path / "pt"))
    assert "--distilled" in line and "class002_id000.png is 12x12" in line and "16x16" in line
    (tmp_path / "images" / "new002" / "class002_id000.png").write_bytes(b"\x89PNG not really")
    line = run_err(capsys, _posttrain(tmp_path / "images", teacher, tmp_path / "pt"))
    assert "class002_id000.png holds an image that cannot be decoded" in line


# --- 4. one writer ------------------------------------------------------------------------------------

WRITER = """
import os, sys, time, torch
from scdd_ray.store.shards import ShardStore
st = ShardStore(sys.argv[1])
st.open("fp")
while not os.path.exists(sys.argv[3]):  # start together, so the writes interleave
    time.sleep(0.01)
for i in range(40):
    st.write_shard(f"{sys.argv[2]}{i:02d}", [0], [i], torch.full((1, 3, 8, 8), i, dtype=torch.uint8))
"""


def test_two_processes_writing_one_store_lose_no_shard(tmp_path):
    root, go = tmp_path / "d", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), p, str(go)], env=ENV) for p in "ab"]
    time.sleep(1.0)
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    st = ShardStore(str(root))
    assert st.done() == {f"{p}{i:02d}" for p in "ab" for i in range(40)}
    assert sorted(f for f in os.listdir(root) if f.endswith(".parquet")) == sorted(
        os.path.basename(f) for f in st.files())
    assert st.verify() == [] and not [f for f in os.listdir(root) if f.startswith(".tmp-")]


HOLDER = """
import sys, time
from scdd_ray.locks import try_lock
lock = try_lock(sys.argv[1])
print("held" if lock else "busy", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_an_out_in_use_is_refused_at_once(tmp_path, capsys, teacher):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK_FILE)], env=ENV, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        t0 = time.perf_counter()
        line = run_err(capsys, ["distill", "--dataset", "synthetic", "--out", str(out)])
        assert "--out" in line and "in use by another scdd-ray run" in line and f"pid {holder.pid}" in line
        assert time.perf_counter() - t0 < 30 and os.listdir(out) == [LOCK_FILE]  # nothing written
        st = ShardStore(str(tmp_path / "set"))
        st.open("fp")
        st.write_shard("a", [0, 1, 2, 3], [0] * 4, _imgs(4, size=16))
        line = run_err(capsys, _posttrain(tmp_path / "set", teacher, out))
        assert "--out" in line and "in use by another scdd-ray run" in line
        assert os.listdir(out) == [LOCK_FILE]
    finally:
        holder.kill()  # kill -9: the OS drops its lock, so nothing stale blocks the next run
        holder.wait()
    lock_out_dir(str(out)).release()


# --- 5. OS errors: one line naming the path, nothing partial ------------------------------------------

def test_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--out", str(tmp_path / "file" / "run")])
    assert "--out" in line and f"{tmp_path / 'file'} is not a directory" in line


def test_an_unknown_timm_architecture_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--arch", "timm:doesnotexist", "--out", str(out)])
    assert "--arch" in line and "'doesnotexist'" in line
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--arch", "timm:resnet18", "--out", str(out)])
    assert "--width" in line and "must be 1" in line
    assert not out.exists()


FULL_DISK = """
import json, os, resource, signal, sys, torch
from scdd_ray.errors import StoreError
from scdd_ray.models.checkpoint import save_checkpoint
from scdd_ray.models.factory import create_model
from scdd_ray.plots import save_grid
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
errors = []
try:
    save_checkpoint(sys.argv[1], create_model("resnet18", 4, width=0.0625), arch="resnet18", width=0.0625,
                    num_classes=4, image_size=16, small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3, method="x")
except StoreError as e:
    errors.append(str(e))
try:
    noise = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    save_grid(sys.argv[2], noise, [0, 1, 2, 3], ["a", "b", "c", "d"])
except StoreError as e:
    errors.append(str(e))
print(json.dumps(errors))
"""


def test_a_write_that_runs_out_of_room_names_the_path_and_leaves_nothing(tmp_path):
    ckpt, grid = tmp_path / "ck" / "student.pt", tmp_path / "grid.png"
    res = subprocess.run([sys.executable, "-c", FULL_DISK, str(ckpt), str(grid)], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    errors = json.loads(res.stdout)
    assert errors == [f"cannot write {ckpt}: File too large", f"cannot write {grid}: File too large"]
    assert os.listdir(tmp_path / "ck") == [] and sorted(os.listdir(tmp_path)) == ["ck"]  # no temp, no half file


# --- 6. outputs follow the umask --------------------------------------------------------------------

def test_outputs_are_created_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(str(tmp_path / "report.json"), b"{}")
        st = ShardStore(str(tmp_path / "d"))
        st.open("fp")
        st.write_shard("s0", [0], [0], _imgs(1))
        written = [tmp_path / "report.json", pathlib.Path(st.files()[0]), pathlib.Path(st.manifest_path)]
        assert [stat.S_IMODE(os.stat(p).st_mode) for p in written] == [0o644] * 3
        os.umask(0o077)
        atomic_write_bytes(str(tmp_path / "private.json"), b"{}")
        assert stat.S_IMODE(os.stat(tmp_path / "private.json").st_mode) == 0o600
    finally:
        os.umask(old)
