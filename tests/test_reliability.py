"""Issue 15, reliability and security: planted pickles never run, damage at rest is found (and repaired
on resume), one writer per output directory, OS errors are one line, outputs follow the umask."""
import contextlib
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


# --- 7. issue 22: bounded waits and SIGTERM -----------------------------------------------------------

def _service(kind):
    """A TCP service on a free local port that is not Ray: silent, or an HTTP server (a dashboard's port)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:  # closed: the test is over
                return
            if kind == "http":
                with contextlib.suppress(OSError):
                    conn.recv(1000)
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            threading.Timer(30, conn.close).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


JOIN = """
import sys
from scdd_ray.dist import cluster
from scdd_ray.cli import main
cluster.JOIN_TIMEOUT_S = 3
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_joining_a_port_where_no_ray_answers_gives_up_naming_the_address(ray_session, tmp_path, capsys,
                                                                        monkeypatch):
    from scdd_ray.cli import build_parser
    from scdd_ray.dist import cluster
    from scdd_ray.dist.cluster import JOIN_TIMEOUT_S, _check_gcs

    _, parsers = build_parser()
    assert f"gives up after {JOIN_TIMEOUT_S:g} s" in " ".join(parsers["distill"].format_help().split())
    out = tmp_path / "run"
    srv, port = _service("http")  # the dashboard's port, say
    with srv:  # in a process of its own: this one is in the test session's Ray already
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", JOIN, "distill", "--dataset", "synthetic", "--address",
                              f"127.0.0.1:{port}", "--out", str(out)], env=ENV, capture_output=True, text=True,
                             timeout=120)
    assert res.returncode == 2 and time.perf_counter() - t0 < 60, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line == (f"scdd-ray: error: --address: no Ray cluster answered at 127.0.0.1:{port} within 3s: an HTTP "
                    "server answers there ('HTTP/1.1 404 Not Found'), not a Ray GCS; the dashboard's port? join at "
                    "the cluster's GCS address (port 6379 unless the head was started with another --port)")
    assert not out.exists()
    srv, port = _service("silent")
    monkeypatch.setattr(cluster, "JOIN_TIMEOUT_S", 2)
    with srv, pytest.raises(ConnectionError, match=f"no Ray cluster answered at 127.0.0.1:{port} within 2s: "
                                                   "something there accepts TCP connections but does not answer"):
        _check_gcs(f"127.0.0.1:{port}", "127.0.0.1", port)
    monkeypatch.undo()
    t0 = time.perf_counter()
    _check_gcs(ray_session.get_runtime_context().gcs_address, "", 0)  # a Ray cluster answers at once
    assert time.perf_counter() - t0 < JOIN_TIMEOUT_S
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--address", "ray://127.0.0.1:10001",
                            "--out", str(out)])
    assert "--address" in line and "pip install 'ray[client]'" in line and not out.exists()


def _distill_argv(out):
    return ["distill", "--dataset", "synthetic", "--num-workers", "2", "--classes-per-batch", "1", "--iterations",
            "100", "--out", str(out)]


def _terminate_when(out, ready, timeout=300):
    """Run distill on `out` in a child process, SIGTERM it once `ready()`; returns (rc, stderr, seconds to stop)."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "scdd_ray", *_distill_argv(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    while not ready() and proc.poll() is None and time.perf_counter() - t0 < timeout:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before the signal"
    t1 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.perf_counter() - t1


def _shards(out):
    try:
        return len(json.loads((out / "distilled" / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sigterm_in_recover_and_in_posttrain_stops_cleanly_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    stopped = "scdd-ray: terminated (SIGTERM); finished work is kept, rerun the same command to resume"
    stale = out / "distilled" / ".tmp-0123456789abcdef"  # a temp file a kill -9 left behind
    kept = {}
    for stage, ready in (("recover", lambda: _shards(out) >= 1), ("posttrain", lambda: (out / "posttrain").exists())):
        rc, err, seconds = _terminate_when(out, ready)
        lines = err.strip().splitlines()
        assert rc == 143 and lines[-1] == stopped, (stage, err[-3000:])
        assert [ln for ln in lines if ln.startswith("scdd-ray:")] == [stopped]
        assert "SIGTERM received" not in err and "Traceback" not in err and seconds < 60
        assert _shards(out) >= 1 and not (out / "report.json").exists()
        if stage == "recover":
            kept = json.loads((out / "distilled" / "manifest.json").read_text())["shards"]
            assert len(kept) < 8  # it was stopped while shards were left
            stale.write_bytes(b"half a shard")
    # the rerun resumed: it kept the shards finished before SIGTERM, computed the others, swept the temp file,
    # and was stopped in post-train (which resumes from its checkpoints as after Ctrl-C: tests/test_posttrain.py)
    shards = json.loads((out / "distilled" / "manifest.json").read_text())["shards"]
    assert len(shards) == 8 and all(shards[k] == v for k, v in kept.items())
    assert not stale.exists() and not list(out.rglob(".tmp-*"))


# --- 8. issue 22: degenerate checkpoints, diverging stages --------------------------------------------

def _saved(path, change=None, num_classes=4, scale_convs=None):
    """A synthetic-dataset checkpoint at `path` (resnet18 width 0.125, 16 px), its payload passed through
    `change` (a function that edits the dict) first."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes, width=0.125)
    if scale_convs:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 4:
                    p.mul_(scale_convs)
    save_checkpoint(str(path), model, arch="resnet18", width=0.125, num_classes=num_classes, image_size=16,
                    small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3, method="simclr")
    if change is not None:
        payload = torch.load(str(path), weights_only=True)
        change(payload)
        torch.save(payload, str(path))
    return path


def _nan(key):
    def change(p):
        p["state_dict"][key][0] = float("nan")
    return change


@pytest.mark.parametrize("flag,change,said", [
    ("--backbone", _nan("conv1.weight"), "conv1.weight holds NaN or infinite values"),
    ("--backbone", _nan("layer2.0.bn1.running_var"), "layer2.0.bn1.running_var holds NaN or infinite values"),
    ("--teacher", _nan("fc.weight"), "fc.weight holds NaN or infinite values"),
    ("--backbone", lambda p: p.update(std=[0.0, 0.0, 0.0]), "its std [0.0, 0.0, 0.0] is not three positive numbers"),
    ("--backbone", lambda p: p.pop("arch"), "its header has no 'arch'"),
    ("--backbone", lambda p: p.update(arch="vgg11"), "its arch 'vgg11' is not one of resnet18"),
    ("--backbone", lambda p: p.update(width="wide"), "its width 'wide' is not a positive number"),
    ("--teacher", lambda p: p.update(num_classes=4.0), "its num_classes 4.0 is not a positive integer"),
    ("--backbone", lambda p: p.update(state_dict=torch.zeros(3)), "its state_dict Tensor is not a mapping"),
    ("--backbone", lambda p: p["state_dict"]["bn1.running_var"].fill_(-1.0), "negative variances"),
])
def test_a_degenerate_checkpoint_is_one_line_before_anything_is_written(tmp_path, capsys, flag, change, said):
    path = _saved(tmp_path / "ck.pt", change)
    out = tmp_path / "run"
    line = run_err(capsys, ["distill", "--dataset", "synthetic", flag, str(path), "--out", str(out)])
    assert line.startswith(f"scdd-ray: error: {flag}: checkpoint {path}: ") and said in line, line
    assert not out.exists()


def test_a_directory_given_as_a_checkpoint_says_so(tmp_path, capsys):
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--backbone", str(tmp_path), "--out",
                            str(tmp_path / "run")])
    assert f"{tmp_path} is a directory; give the checkpoint file" in line


def test_a_diverging_recover_stops_naming_the_shard_and_keeps_finished_shards(ray_session, tmp_path):
    from scdd_ray.config import RecoverConfig
    from scdd_ray.core.shards import plan_shards, run_local
    from scdd_ray.dist.synthesis import run_ray
    from scdd_ray.errors import Diverged
    from scdd_ray.models.checkpoint import load_checkpoint
    from scdd_ray.models.runtime import frozen

    ckpt = load_checkpoint(str(_saved(tmp_path / "big.pt", scale_convs=1e30)))  # finite weights, inf activations
    cfg = RecoverConfig(iterations=2, lr=0.1, bn_coef=0.1, jitter=2, crop_scale=(0.5, 1.0), classes_per_batch=2)
    shards = plan_shards(4, 1, 2)
    for engine in ("local", "ray"):
        store = ShardStore(str(tmp_path / engine))
        store.open("fp")
        store.write_shard(shards[0].id, *shards[0].rows(), _imgs(2, size=16))  # finished before
        t0 = time.perf_counter()
        with pytest.raises(Diverged, match=f"recover stopped at shard {shards[1].id}: its loss is nan"):
            if engine == "local":
                run_local(frozen(ckpt.build()), shards, store, cfg, ckpt.mean, ckpt.std, 16, 0)
            else:  # not retried: it would diverge again
                run_ray(ckpt, shards, store, cfg, 16, 0, num_workers=1, use_gpu=False)
        assert store.done() == {shards[0].id} and time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_a_diverging_posttrain_stops_naming_the_epoch(ray_session, tmp_path, capsys):
    from scdd_ray.core.configs import PosttrainConfig
    from scdd_ray.core.posttrain import PostTrainer
    from scdd_ray.data import load_split
    from scdd_ray.errors import Diverged
    from scdd_ray.models.checkpoint import load_checkpoint
    from scdd_ray.models.runtime import frozen

    path = _saved(tmp_path / "t.pt", scale_convs=1e30)  # finite weights, inf logits
    teacher = frozen(load_checkpoint(str(path)).build())
    train = load_split("synthetic", "train", None, 16)
    cfg = PosttrainConfig(student="resnet18", student_width=0.0625, epochs=2, batch_size=8, temperature=4.0,
                          crop_scale=(0.5, 1.0), flip=False)
    trainer = PostTrainer(cfg, train.images[:8], teacher, train.info, image_size=16, small_input=True, seed=0)
    with pytest.raises(Diverged, match="post-train stopped at epoch 1: its loss is nan"):
        trainer.fit()
    assert trainer.state["epoch"] == 0
    st = ShardStore(str(tmp_path / "set"))  # on Ray Train: one line, without "rerun to resume"
    st.open("fp")
    st.write_shard("a", [0, 1, 2, 3], [0] * 4, _imgs(4, size=16))
    line = run_err(capsys, _posttrain(tmp_path / "set", path, tmp_path / "pt"))
    assert line.startswith("scdd-ray: error: post-train stopped at epoch 1: its loss is nan; the teacher's "
                           "outputs or the post-train settings (--posttrain-lr, --posttrain-temperature) make it "
                           "diverge")


def test_a_damaged_cached_backbone_is_trained_again(tmp_path, caplog):
    from scdd_ray.backbones import plan_models, resolve_models
    from scdd_ray.config import build_distill_config
    from scdd_ray.data import dataset_info

    cfg = build_distill_config("synthetic", str(tmp_path / "run"), {"squeeze.epochs": 1})
    path = tmp_path / "run" / "backbones" / os.path.basename(plan_models(cfg).backbone.path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"cut short by a full disk")
    with caplog.at_level("WARNING", logger="scdd_ray"):
        models = resolve_models(cfg, dataset_info("synthetic", None, 16), "cpu")
    assert models.backbone_path == str(path)
    assert "not a readable torch file" in caplog.text and "training it again" in caplog.text
    assert models.backbone.arch == cfg.arch and load_checkpoint_ok(path)


def load_checkpoint_ok(path):
    from scdd_ray.models.checkpoint import load_checkpoint

    return load_checkpoint(str(path)).num_classes == 4


# --- 9. issue 22: malformed Parquet datasets, classes without rows, mixed sizes -----------------------

def _hf(root, **kw):
    from test_parquet import make_hf

    make_hf(root, **kw)
    return root


def _table(path):
    import pyarrow.parquet as pq

    return pq.read_table(str(path))


def _write(table, path):
    import pyarrow.parquet as pq

    pq.write_table(table, str(path))


def _distill_parquet(capsys, data, *extra):
    out = data.parent / "run"
    line = run_err(capsys, ["distill", "--dataset", "parquet", "--data-dir", str(data), "--out", str(out), *extra])
    assert not out.exists()
    return line


TRAIN, TEST = "train-00000-of-00001.parquet", "test-00000-of-00001.parquet"


def test_an_undecodable_first_image_is_one_line_also_when_the_size_is_probed(tmp_path, capsys, monkeypatch):
    from test_parquet import _png

    import numpy as np

    data = _hf(tmp_path / "d", labels=[0, 1, 2], blobs=[b"not an image"] + [_png(np.zeros((8, 8, 3), np.uint8))] * 2)
    for extra in ((), ("--image-size", "8")):  # the size probe reads row 0 first
        line = _distill_parquet(capsys, data, *extra)
        assert f"{data / TRAIN} row 0: the image does not decode" in line
    data = _hf(tmp_path / "bomb")
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 10)  # 8x8 images are now "bombs" (more than twice that)
    line = _distill_parquet(capsys, data)
    assert f"{data / TRAIN} row 0: the image does not decode (DecompressionBombError)" in line


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_with_zero_rows_is_one_line(tmp_path, capsys, split):
    data = _hf(tmp_path / "d")
    path = data / f"{split}-00000-of-00001.parquet"
    _write(_table(path).slice(0, 0), path)
    for extra in ((), ("--image-size", "8")):
        line = _distill_parquet(capsys, data, *extra)
        assert f"{path}: the split holds no rows" in line


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_empty_or_truncated_train_file_is_one_line_on_the_probing_path(tmp_path, capsys, damage):
    data = _hf(tmp_path / "d")
    path = data / TRAIN
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[: path.stat().st_size // 2])
    line = _distill_parquet(capsys, data)
    assert f"{path} is not a readable Parquet file" in line


@pytest.mark.parametrize("column", [0, 1])  # the images (read by the size probe too), the labels
def test_a_damaged_column_chunk_under_an_intact_footer_is_one_line(tmp_path, capsys, column):
    import pyarrow.parquet as pq

    data = _hf(tmp_path / "d")
    path = data / TRAIN
    chunk = pq.ParquetFile(str(path)).metadata.row_group(0).column(column)
    raw = bytearray(path.read_bytes())
    start = chunk.data_page_offset
    raw[start:start + 16] = b"\xff" * 16  # the page header: the footer still says all is well
    path.write_bytes(bytes(raw))
    for extra in ((), ("--image-size", "8")):
        line = _distill_parquet(capsys, data, *extra)
        assert f"{path} is damaged: its data cannot be read" in line


@pytest.mark.parametrize("key,value,said", [
    ("classes", "[\"a\", \"b\"", "its 'classes' schema metadata is not valid JSON"),
    ("classes", "[[\"a\"], {\"b\": 1}]", "its 'classes' metadata is not a list of class names"),
    ("huggingface", "{\"info\": ", "its 'huggingface' schema metadata is not valid JSON"),
    ("huggingface", "[1, 2]", "its 'huggingface' metadata is not the features record"),
])
def test_malformed_class_metadata_is_one_line(tmp_path, capsys, key, value, said):
    data = _hf(tmp_path / "d", meta_key=None)
    path = data / TRAIN
    _write(_table(path).replace_schema_metadata({key: value}), path)
    line = _distill_parquet(capsys, data)
    assert f"{path}: {said}" in line


def test_a_class_without_training_rows_or_labels_with_gaps_are_one_line(tmp_path, capsys):
    data = _hf(tmp_path / "named", labels=[0, 0, 1, 1])  # classes a, b, c: c has no rows
    line = _distill_parquet(capsys, data, "--init", "real")
    assert f"{data / TRAIN}: class 2 ('c') has no rows in the train split" in line
    data = _hf(tmp_path / "sparse", labels=[0, 0, 5, 5, 99, 99], meta_key=None)  # no names: not 100 classes
    line = _distill_parquet(capsys, data, "--method", "random")
    assert f"{data / TRAIN}: the train split has labels up to 99 but no rows of label 1" in line
    assert "classes.txt" in line
    (data / "classes.txt").write_text("\n".join(f"c{i}" for i in range(100)))  # a class map: 100 classes
    line = _distill_parquet(capsys, data, "--method", "random")
    assert "class 1 ('c1') has no rows in the train split" in line


def test_a_cifar_class_without_training_images_is_one_line(tmp_path, capsys):
    import pickle

    from helpers import make_cifar

    root = make_cifar(tmp_path / "c", "cifar10", per_class=10)
    for f in [f"data_batch_{i}" for i in range(1, 6)]:  # class 9 loses its training images
        path = tmp_path / "c" / "cifar-10-batches-py" / f
        d = pickle.loads(path.read_bytes())
        keep = [i for i, y in enumerate(d[b"labels"]) if y != 9]
        path.write_bytes(pickle.dumps({b"data": d[b"data"][keep], b"labels": [d[b"labels"][i] for i in keep]}))
    out = tmp_path / "run"
    line = run_err(capsys, ["distill", "--dataset", "cifar10", "--data-dir", root, "--out", str(out)])
    assert "--data-dir" in line and "class 9 ('c9') has no images in the train split" in line
    assert not out.exists()


def test_images_of_mixed_sizes_are_one_line_not_resized(tmp_path, capsys):
    from test_parquet import _png

    import numpy as np

    blobs = [_png(np.zeros((16, 16, 3), np.uint8))] + [_png(np.zeros((32, 32, 3), np.uint8))] * 5
    data = _hf(tmp_path / "d", labels=[0, 0, 1, 1, 2, 2], blobs=blobs)
    for extra in ((), ("--image-size", "32")):
        line = _distill_parquet(capsys, data, *extra)
        assert f"{data / TRAIN} row 1: the image is 32x32 but {data / TRAIN} row 0 is 16x16" in line
    data = _hf(tmp_path / "e", size=8)  # train 8x8, test 12x12
    test = _table(data / TEST)
    _hf(tmp_path / "e12", size=12)
    _write(_table(tmp_path / "e12" / TEST), data / TEST)
    line = _distill_parquet(capsys, data)
    assert f"{data / TEST} row 0: the image is 12x12 but {data / TRAIN} row 0 is 8x8" in line
    assert test.num_rows == 12


def test_holdout_runs_need_no_test_split(tmp_path, capsys):
    from scdd_ray.config import build_distill_config
    from scdd_ray.pipeline import distill

    data = _hf(tmp_path / "d", splits=("train",), per_class=8)
    line = _distill_parquet(capsys, data)
    assert "has no test split" in line
    cfg = build_distill_config("parquet", str(tmp_path / "run"), {"data_dir": str(data), "holdout": True})
    prep = distill.prepare(cfg)  # every input check passes: the test split is never read
    prep.lock.release()
    assert prep.info.num_classes == 3


# --- 10. issue 22: distilled sets checked against their run's plan ------------------------------------

def _planned_store(root, ipcs, meta_plan=True, extra=None):
    """A synthetic-dataset set of a run with ipc 2 (4 classes), holding the IPC indices `ipcs`."""
    from scdd_ray.config import build_distill_config

    cfg = build_distill_config("synthetic", str(root), {})
    meta = {"dataset": "synthetic", "method": "scdd", "ipc": 2}
    if meta_plan:
        meta.update(num_classes=4, per_class=[2] * 4)
    st = ShardStore(str(root / "distilled"))
    st.open(cfg.fingerprint(), meta)
    for j in ipcs:
        st.write_shard(f"ipc{j:04d}-c00000-00003", [0, 1, 2, 3], [j] * 4, _imgs(4, j, size=16))
    (root / "run.json").write_text(json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}))
    return root


def test_posttrain_refuses_an_incomplete_set_unless_asked(ray_session, tmp_path, capsys, teacher):
    from scdd_ray.pipeline.posttrain import PosttrainRequest, prepare_posttrain
    from scdd_ray.schema import PosttrainOptions

    for meta_plan in (True, False):  # also a manifest written before runs recorded their plan
        run = _planned_store(tmp_path / f"run{meta_plan}", [0], meta_plan)  # interrupted: IPC index 1 missing
        for src in (run, run / "distilled"):
            line = run_err(capsys, _posttrain(src, teacher, tmp_path / "pt"))
            assert "--distilled" in line and "is incomplete, 4 of the 8 images of its run's plan missing (first: " \
                                              "class 0 IPC index 1)" in line
    assert not (tmp_path / "pt").exists()
    req = PosttrainRequest(PosttrainOptions(distilled=str(run), out=str(tmp_path / "pt"), partial=True),
                           {"teacher": str(teacher)})
    images = prepare_posttrain(req)[2]  # on purpose: posttrain --partial
    assert len(images) == 4
    bare = tmp_path / "bare"  # its shard files without the manifest carry no plan: trained on as they are
    bare.mkdir()
    for f in ShardStore(str(run / "distilled")).files():
        (bare / os.path.basename(f)).write_bytes(pathlib.Path(f).read_bytes())
    req = PosttrainRequest(PosttrainOptions(distilled=str(bare), out=str(tmp_path / "pt")),
                           {"teacher": str(teacher), "dataset": "synthetic"})
    assert len(prepare_posttrain(req)[2]) == 4


def test_rows_outside_a_runs_plan_are_refused_by_posttrain_and_distill(tmp_path, capsys, teacher):
    run = _planned_store(tmp_path / "run", [0, 1, 2])  # a valid shard of IPC index 2 added to an ipc-2 run
    line = run_err(capsys, _posttrain(run, teacher, tmp_path / "pt"))
    assert "--distilled" in line and "holds 4 images outside its run's plan (first: class 0 IPC index 2" in line
    before = sorted(str(p) for p in run.rglob("*"))
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--out", str(run)])
    assert "--out" in line and "lists shard ipc0002-c00000-00003, which this run does not plan" in line
    assert sorted(str(p) for p in run.rglob("*")) == before and not (tmp_path / "pt").exists()


# --- 11. issue 22: no output path overwrites a file that is not ours ----------------------------------

def test_squeeze_out_never_replaces_a_file_that_is_not_a_checkpoint_of_ours(tmp_path, capsys):
    mine = tmp_path / "README.md"
    mine.write_text("my notes")
    t0 = time.perf_counter()
    line = run_err(capsys, ["squeeze", "--dataset", "synthetic", "--out", str(mine)])
    assert "--out" in line and f"{mine} exists and is not an scdd-ray checkpoint; it is not replaced" in line
    line = run_err(capsys, ["squeeze", "--dataset", "synthetic", "--out", str(tmp_path)])
    assert "--out" in line and f"{tmp_path} is a directory" in line
    assert time.perf_counter() - t0 < 30 and mine.read_text() == "my notes"  # refused before any training
    from scdd_ray.cli import main
    from scdd_ray.models.checkpoint import load_checkpoint

    ours = _saved(tmp_path / "ours.pt")
    assert main(["-q", "squeeze", "--dataset", "synthetic", "--squeeze-epochs", "1", "--out", str(ours)]) == 0
    assert load_checkpoint(str(ours)).meta["epochs"] == 1  # one of ours is replaced: a new squeeze


def test_a_users_own_lock_file_is_never_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("my notes")
    line = run_err(capsys, ["distill", "--dataset", "synthetic", "--out", str(out)])
    assert "--out" in line and "is not empty" in line
    assert os.listdir(out) == [".lock"] and (out / ".lock").read_text() == "my notes"
    assert LOCK_FILE == ".scdd-ray.lock"


# --- 12. issue 22: Tune YAML errors name the file and its key --------------------------------------------

def test_tune_yaml_that_is_not_text_or_has_bad_values_is_one_line_naming_the_yaml_key(tmp_path, capsys):
    import yaml

    from test_tune import TINY

    p, out = tmp_path / "sweep.yaml", tmp_path / "out"
    p.write_bytes(b"name: \xff\xfe sweep\n")
    line = run_err(capsys, ["tune", "--config", str(p), "--out", str(out)])
    assert line == f"scdd-ray: error: --config: {p} is not UTF-8 text (is it a YAML file?)"
    p.write_text(yaml.safe_dump({**TINY, "data_dir": 123}))
    line = run_err(capsys, ["tune", "--config", str(p), "--out", str(out)])
    assert line == f"scdd-ray: error: --config: {p}: data_dir: must be a string (got 123)"
    p.write_text(yaml.safe_dump({**TINY, "num_samples": 0}))
    line = run_err(capsys, ["tune", "--config", str(p), "--out", str(out)])
    assert f"--config: {p}: num_samples: must be a positive integer" in line and "--num-samples" not in line
    line = run_err(capsys, ["tune", "--config", str(p.with_suffix(".yml")), "--num-samples", "0", "--out", str(out)])
    assert "--config" in line  # checked first; a bad flag is still named as the flag:
    p.write_text(yaml.safe_dump(TINY))
    line = run_err(capsys, ["tune", "--config", str(p), "--num-samples", "0", "--out", str(out)])
    assert line.startswith("scdd-ray: error: --num-samples: must be a positive integer")
    assert not out.exists()
