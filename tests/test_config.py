"""One recipe: presets as data, `--config` files, `--print-config`, flags generated from the schema."""
import dataclasses
import json

import pytest
import yaml

from scdd_ray import presets
from scdd_ray.cli import COMMANDS, FLAGS, build_parser, main
from scdd_ray.config import build_config, flatten, read_config_file, recipe_fields, to_yaml
from scdd_ray.data import names as dataset_names
from scdd_ray.errors import ConfigError

from test_cli_errors import run_err


@pytest.mark.parametrize("gpu", [False, True])
def test_every_preset_builds_a_valid_configuration(gpu):
    """Every dataset has a preset at both scales, and every key and value in it is one the schema takes."""
    for name in dataset_names():
        assert presets.file_name(name, gpu), f"{name} has no preset"
        cfg = build_config({"dataset": name, "out": "o"}, gpu=gpu, run=False)
        raw = flatten(presets.load(name, gpu))
        for k, v in raw.items():  # the preset's values reach the configuration unchanged (lists as tuples)
            got = dataclasses.asdict(cfg) if "." not in k else dataclasses.asdict(getattr(cfg, k.split(".")[0]))
            assert got[k.rpartition(".")[2]] == (tuple(v) if isinstance(v, list) else v) or k == "image_size", k


def test_cifar10_scales_differ_and_extends_merges_sections():
    cpu, gpu = presets.load("cifar10", False), presets.load("cifar10", True)
    assert cpu["width"] == 0.25 and gpu["width"] == 1.0
    # cifar10-gpu extends cifar100: its recover section overrides two keys and keeps the others
    assert gpu["recover"]["ipc_per_shard"] == 10 and gpu["recover"]["lr"] == presets.load("cifar100", True)["recover"]["lr"]
    assert presets.file_name("digits", True) == presets.file_name("digits", False) == "digits"


def test_file_then_flags_over_the_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"dataset": "digits", "ipc": 3, "recover": {"iterations": 7, "lr": 0.5}}))
    cfg = build_config({"recover.lr": 0.3, "out": "o"}, read_config_file(str(f)))
    assert (cfg.ipc, cfg.recover.iterations, cfg.recover.lr) == (3, 7, 0.3)
    assert cfg.recover.bn_coef == presets.load("digits", False)["recover"]["bn_coef"]  # untouched: the preset's


@pytest.mark.parametrize("content,key", [
    ({"recover": {"iteratons": 5}}, "recover.iteratons"),
    ({"bogus": 1}, "bogus"),
    ({"recover": {"lr": "fast"}}, "recover.lr"),
    ({"recover": {"lr": "5e-4"}}, "recover.lr"),  # YAML 1.1 reads 5e-4 without a dot as a string
    ({"ipc": 2.5}, "ipc"),
    ({"recover": 3}, "recover"),
])
def test_bad_config_files_name_the_key(tmp_path, capsys, content, key):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(content))
    line = run_err(capsys, ["distill", "--config", str(f), "--out", str(tmp_path / "out")])
    assert f"{key}:" in line and "--" not in line, line  # named as the file's key, not as a flag
    assert not (tmp_path / "out").exists()


def test_config_file_that_is_not_a_mapping(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("- a\n- b\n")
    assert "--config" in run_err(capsys, ["distill", "--config", str(f), "--out", str(tmp_path / "o")])
    f.write_bytes(b"\xff\xfe\x00bad")
    assert "--config" in run_err(capsys, ["distill", "--config", str(f), "--out", str(tmp_path / "o")])


def test_print_config_prints_a_valid_config_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["distill", "--dataset", "digits", "--iterations", "9", "--out", str(out), "--print-config"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    printed = yaml.safe_load(text)
    assert printed["recover"]["iterations"] == 9 and printed["out"] == str(out)
    f = tmp_path / "printed.yaml"
    f.write_text(text)
    again = build_config({}, read_config_file(str(f)))
    assert again == build_config({"dataset": "digits", "recover.iterations": 9, "out": str(out)})
    assert to_yaml(again) == text


def test_run_json_is_a_config_file(tmp_path):
    cfg = build_config({"dataset": "synthetic", "ipc": 3, "recover.jitter": 1, "out": str(tmp_path / "a")})
    record = tmp_path / "run.json"
    record.write_text(json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}))
    again = build_config({"out": str(tmp_path / "b")}, read_config_file(str(record)))
    assert again.fingerprint() == cfg.fingerprint() and again.out == str(tmp_path / "b")
    assert dataclasses.replace(again, out=cfg.out) == cfg


def test_one_flag_is_one_field_in_every_command():
    """A flag string names the same field wherever it appears; no two fields share a flag."""
    _, parsers = build_parser()
    seen: dict[str, str] = {}
    for name, p in parsers.items():
        for a in p._actions:
            for flag in a.option_strings:
                if flag in ("-h", "--help") or not a.dest:
                    continue
                dest = a.dest.removeprefix("opt:")
                assert seen.setdefault(flag, dest) == dest, f"{flag} is {seen[flag]} and {dest} ({name})"
    fields = set(recipe_fields())
    assert all(k in fields for k in FLAGS)
    assert FLAGS["recover.lr"] == ("--recover-lr",) and FLAGS["posttrain.lr"] == ("--posttrain-lr",)
    assert FLAGS["recover.bn_coef"] == ("--recover-bn-coef", "--bn-coef")
    assert set(COMMANDS["distill"].recipe) == fields  # distill takes every setting as a flag


def test_help_shows_the_dataset_preset(capsys):
    for dataset, iterations in (("digits", presets.load("digits", False)["recover"]["iterations"]),
                                ("synthetic", presets.load("synthetic", False)["recover"]["iterations"])):
        with pytest.raises(SystemExit):
            main(["distill", "--dataset", dataset, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"recover iterations per batch [{iterations}]" in text


def test_errors_from_flags_name_the_flag_and_from_presets_never_happen(capsys, tmp_path):
    line = run_err(capsys, ["distill", "--dataset", "digits", "--recover-lr", "-1", "--out", str(tmp_path / "o")])
    assert line.startswith("scdd-ray: error: --recover-lr: ")
    line = run_err(capsys, ["distill", "--dataset", "digits", "--posttrain-lr", "0", "--out", str(tmp_path / "o")])
    assert line.startswith("scdd-ray: error: --posttrain-lr: ")
    with pytest.raises(ConfigError):
        build_config({"dataset": "digits", "recover.nope": 1})


@pytest.mark.parametrize("dataset,gpu", [("cifar10", False), ("cifar10", True), ("cifar100", True), ("parquet", False)])
def test_cifar_presets_post_train_as_the_authors_cifar_code(dataset, gpu):
    """The protocol measurement (benchmarks/results/cifar10_size_protocol.md) decided these: the teacher labels
    with each batch's BN statistics, and the cosine runs over three times the run, as the authors' CIFAR code."""
    pt = build_config({"dataset": dataset, "num_gpus": int(gpu)}, run=False).posttrain
    assert (pt.teacher_bn, pt.cosine_period) == ("train", 3.0)


def test_digits_keeps_its_measured_post_training():
    pt = build_config({"dataset": "digits"}, run=False).posttrain
    assert (pt.teacher_bn, pt.cosine_period) == ("eval", 1.0)


def test_train_noval_reads_test_with_the_holdout_screens_models(tmp_path):
    """After a screen on the validation share, `train_noval` keeps training on train less that share (the
    screen's cached models by the same names, its real-image pool) and moves top-1 to the test split."""
    from scdd_ray.backbones import plan_models
    from scdd_ray.config import build_distill_config

    def cfg(**given):
        return build_distill_config("synthetic", str(tmp_path / "o"), {"models_dir": str(tmp_path / "m"), **given})

    screen, read, plain = cfg(holdout=True), cfg(train_noval=True), cfg()
    assert (screen.train_split, screen.eval_split) == ("train-noval", "val")
    assert (read.train_split, read.eval_split) == ("train-noval", "test")
    assert (plain.train_split, plain.eval_split) == ("train", "test")
    assert plan_models(read).backbone.path == plan_models(screen).backbone.path != plan_models(plain).backbone.path
    assert plan_models(read).teachers[0].path == plan_models(screen).teachers[0].path
    assert len(read.split("train")) == len(screen.split("train")) < len(plain.split("train"))
    assert len(read.split("test")) == len(plain.split("test"))
    assert plain.fingerprint() == cfg(train_noval=False).fingerprint() != read.fingerprint()


def test_a_named_recipe_is_its_base_method_with_its_recover_settings(tmp_path, capsys):
    """`scdd-patches` recovers from scdd's SSL backbone with its own recover settings over the preset; the
    user's settings still win, and `scdd` stays the paper's method."""
    from scdd_ray.backbones import plan_models
    from scdd_ray.config import build_distill_config
    from scdd_ray.methods import RECIPES

    out = str(tmp_path / "o")
    paper = build_distill_config("cifar10", out, {"method": "scdd", "models_dir": str(tmp_path)})
    recipe = build_distill_config("cifar10", out, {"method": "scdd-patches", "models_dir": str(tmp_path)})
    r = recipe.recover
    assert (r.init, r.init_pool, r.init_crops, r.init_patches, r.iterations) == ("real", 100, 5, 2, 100)
    assert {k: getattr(r, k) for k in RECIPES["scdd-patches"].recover} == RECIPES["scdd-patches"].recover
    assert (paper.recover.init, paper.recover.iterations) == ("noise", 500)  # the preset's, the paper's
    assert (r.bn_coef, r.lr) == (paper.recover.bn_coef, paper.recover.lr) and recipe.posttrain == paper.posttrain
    assert recipe.squeeze.method == paper.squeeze.method == "simclr"
    assert plan_models(recipe).backbone.path == plan_models(paper).backbone.path  # the same SSL backbone
    assert recipe.fingerprint() != paper.fingerprint()
    mine = build_distill_config("cifar10", out, {"method": "scdd-patches", "recover.iterations": 20})
    assert (mine.recover.iterations, mine.recover.init_patches) == (20, 2)
    assert run_err(capsys, ["distill", "--dataset", "cifar10", "--method", "scdd-patches", "--squeeze-method",
                            "supervised", "--out", out]).startswith("scdd-ray: error: --squeeze-method:")
