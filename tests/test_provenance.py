"""Benchmark JSONs say where they came from: the command (a line a reader can paste), the commit and the
machine (scdd_ray.provenance), stamped by the CLI on what `scdd-ray bench ...` writes."""
import json
import os
import shlex
import subprocess

from scdd_ray.provenance import commit, cpu, provenance, stamped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_command_is_a_line_that_splits_back_into_the_arguments():
    argv = ["bench", "table", "--dataset", "digits", "--data-dir", "my data", "--json", "t.json"]
    p = provenance(argv)
    assert p["command"] == "scdd-ray bench table --dataset digits --data-dir 'my data' --json t.json"
    assert shlex.split(p["command"])[1:] == argv
    assert p["machine"]["cpu_count"] == os.cpu_count() and p["machine"]["torch"]


def test_the_cpu_is_named_with_the_extensions_its_float_kernels_depend_on(tmp_path):
    info = tmp_path / "cpuinfo"
    core = ("processor\t: {n}\nmodel name\t: Intel(R) Xeon(R) Processor\npower management:\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n\n")
    info.write_text(core.format(n=0) + core.format(n=1))
    assert cpu(str(info)) == {"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_isa": ["avx2", "avx512f", "avx512_bf16"]}
    info.write_text("processor\t: 0\n")  # an emulator's: nothing to say
    assert cpu(str(info)) == {}


def test_commit_is_the_checkouts_head_or_none_outside_git(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert commit().split("+")[0] == head.stdout.strip()
    assert commit(str(tmp_path / "x.py")) is None  # not a git checkout


def test_stamped_puts_provenance_first_and_lets_it_win():
    out = stamped({"benchmark": "scaling", "machine": "x86_64", "results": [1]}, ["bench", "scaling"])
    assert list(out)[:3] == ["command", "commit", "machine"]
    assert isinstance(out["machine"], dict) and out["results"] == [1]


def test_bench_recover_json_names_its_command(tmp_path):
    from scdd_ray.cli import main

    out = tmp_path / "r.json"
    argv = ["-q", "bench", "recover", "--width", "0.125", "--image-size", "16", "--num-classes", "4", "--batch", "4",
            "--timed-iterations", "1", "--threads", "1", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["command"] == shlex.join(["scdd-ray", *argv]) and res["img_iters_per_s"] > 0
    assert "commit" in res and res["machine"]["torch_threads"] >= 1
