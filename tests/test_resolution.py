"""One model resolution: distill, bench table, bench models and tune ask backbones.plan_models /
resolve_models, so one configuration gets the same backbone and teacher files in all four."""
import os

import torch

from scdd_ray.backbones import plan_models, resolve_models
from scdd_ray.bench.models import cell_config
from scdd_ray.bench.table import TableSpec, cell_models
from scdd_ray.config import build_config
from scdd_ray.data import dataset_info
from scdd_ray.dist.tune import prepare_models
from scdd_ray.models.checkpoint import load_checkpoint, save_checkpoint
from scdd_ray.models.factory import create_model
from scdd_ray.pipeline import distill
from scdd_ray.tune_config import load_tune_config

METHODS = ("scdd", "sre2l")


def test_four_front_ends_resolve_the_same_backbone_and_teacher_files(ray_session, tmp_path):
    models = str(tmp_path / "models")
    recipe = {"models_dir": models, "holdout": True, "squeeze.epochs": 1, "squeeze.probe_epochs": 1}
    info = dataset_info("synthetic", None, 16)
    seen = {}
    for method in METHODS:
        cfg = build_config({"dataset": "synthetic", **recipe, "method": method, "out": str(tmp_path / method)})
        prep = distill.prepare(cfg)
        try:
            m = distill._models(prep, torch.device("cpu"))
        finally:
            prep.lock.release()
        seen[("distill", method)] = (m.backbone_path, m.teacher_path)
        spec = TableSpec("synthetic", str(tmp_path / "table"), overrides=recipe)
        paths = cell_models(spec, method, spec.ipcs[0], spec.seeds[0])
        seen[("bench table", method)] = (paths["backbone"], paths["teacher"])
        m = resolve_models(cell_config(str(tmp_path / "bench"), "resnet18", method, {"dataset": "synthetic", **recipe}),
                           info, torch.device("cpu"))
        seen[("bench models", method)] = (m.backbone_path, m.teacher_path)
    sweep = load_tune_config({"dataset": "synthetic", "models_dir": models, "squeeze": {"epochs": 1, "probe_epochs": 1},
                              "archs": ["resnet18"], "methods": list(METHODS), "scheduler": {"name": "fifo"},
                              "search": {"bn_coef": {"choice": [0.1]}}})
    for (arch, method), (_, m) in prepare_models(sweep, str(tmp_path / "sweep")).items():
        seen[("tune", method)] = (m.backbone_path, m.teacher_path)
    for method in METHODS:
        assert len({seen[(f, method)] for f in ("distill", "bench table", "bench models", "tune")}) == 1, seen
    (scdd_backbone, teacher), (sre2l_backbone, sre2l_teacher) = seen[("distill", "scdd")], seen[("distill", "sre2l")]
    # one supervised teacher for both methods; sre2l recovers from it, scdd from its SSL backbone
    assert teacher == sre2l_teacher == sre2l_backbone != scdd_backbone
    assert load_checkpoint(teacher).method == "supervised" and load_checkpoint(scdd_backbone).method == "simclr"
    assert sorted(f for f in os.listdir(models) if not f.startswith(".")) == sorted(
        os.path.basename(p) for p in (teacher, scdd_backbone))  # two models squeezed, for all four front ends


def test_the_plan_names_what_the_configuration_says(tmp_path):
    base = {"dataset": "synthetic", "out": str(tmp_path / "run")}
    scdd = plan_models(build_config(base))
    assert scdd.backbone.path.startswith(str(tmp_path / "run" / "backbones"))  # OUT/backbones unless models_dir
    assert os.path.basename(scdd.backbone.path).startswith("simclr-")
    assert os.path.basename(scdd.teacher.path).startswith("supervised-") and not scdd.teacher.given
    sre2l = plan_models(build_config({**base, "method": "sre2l"}))
    assert sre2l.teacher is sre2l.backbone and sre2l.backbone.path == scdd.teacher.path
    random = plan_models(build_config({**base, "method": "random"}))
    assert random.backbone is None and random.teacher.path == scdd.teacher.path
    own = plan_models(build_config({**base, "teacher": "backbone"}))
    assert own.teacher is own.backbone
    outside = tmp_path / "t.pt"
    save_checkpoint(str(outside), create_model("resnet18", 4, 0.125), arch="resnet18", width=0.125, num_classes=4,
                    image_size=16, small_input=True, mean=(0.5,) * 3, std=(0.25,) * 3, method="supervised")
    for method in ("scdd", "sre2l", "random"):  # a named teacher relabels every method, sre2l's included
        plan = plan_models(build_config({**base, "method": method, "teacher": str(outside)}))
        assert plan.teacher.given and plan.teacher.path == str(outside)
    # a named supervised backbone of the run's arch relabels too, as the squeezed one does
    named = plan_models(build_config({**base, "method": "sre2l", "backbone": str(outside)}))
    assert named.teacher is named.backbone
