"""Post-train: crops shared by every worker count, the teacher labels the student's very crop,
stored soft labels equal online ones, and an interrupted Ray Train run resumes to exactly its epochs."""
import copy
import dataclasses
import math
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scdd_ray.config import PosttrainConfig
from scdd_ray.core.augment import normalize, to_float
from scdd_ray.core.posttrain import (
    PostTrainer,
    epoch_batches,
    global_batch,
    make_optimizer,
    rank_rows,
    run_epoch,
    scaled_lr,
    steps_per_epoch,
    train_step,
)
from scdd_ray.core.posttrain_job import PosttrainJob
from scdd_ray.core.configs import fingerprint_view
from scdd_ray.core.relabel import make_crops, plan_crops, soft_labels
from scdd_ray.core.schedules import cosine_lr
from scdd_ray.core.soft_labels import soft_label_rows, stored_batches
from scdd_ray.data import load_split
from scdd_ray.dist import posttrain as dist_train
from scdd_ray.dist.posttrain import run_posttrain
from scdd_ray.errors import EngineError
from scdd_ray.models.checkpoint import load_checkpoint, save_checkpoint
from scdd_ray.models.factory import create_model
from scdd_ray.models.runtime import frozen
from scdd_ray.store.encoded import EncodedImages, images_digest
from scdd_ray.store.shards import ShardStore
from scdd_ray.store.soft_labels import write_soft_labels

SIZE = 16
MEAN, STD = (0.5,) * 3, (0.25,) * 3
CFG = PosttrainConfig(student="resnet18", student_width=0.125, epochs=4, batch_size=5, lr=2e-3, temperature=4.0,
                      mix="cutmix", mix_prob=1.0, crop_scale=(0.5, 1.0), flip=True, checkpoint_every=1)


def _info():
    return load_split("synthetic", "test", None, SIZE).info


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_rows_partition_the_global_batch_and_weigh_to_its_mean(world):
    batch = 25
    parts = [rank_rows(batch, r, world) for r in range(world)]
    rows = torch.cat([p[0] for p in parts])
    assert torch.equal(rows, torch.arange(batch))
    # DDP averages the workers' gradients: weights make that average the global-batch mean.
    per_sample = sum(w / len(r) * len(r) for r, w in parts) / world
    assert per_sample == pytest.approx(1.0)
    for r, w in parts:
        assert w == pytest.approx(len(r) * world / batch)


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_any_subset_of_rows_gets_the_crops_of_the_whole_batch(mix):
    cfg = dataclasses.replace(CFG, mix=mix)
    images = _images(10)
    plan = plan_crops(10, cfg, SIZE, torch.Generator().manual_seed(3))
    full = make_crops(images, plan, SIZE, MEAN, STD)
    for world in (2, 3):
        parts = [make_crops(images, plan, SIZE, MEAN, STD, rank_rows(10, r, world)[0]) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    if mix != "none":
        assert plan.mix == mix and not torch.equal(plan.partner, torch.arange(10))


def test_epoch_plan_depends_only_on_seed_and_epoch():
    a = epoch_batches(12, CFG, SIZE, seed=1, epoch=3)
    b = epoch_batches(12, CFG, SIZE, seed=1, epoch=3)
    c = epoch_batches(12, CFG, SIZE, seed=1, epoch=4)
    assert len(a) == steps_per_epoch(12, 5) == 2
    assert all(torch.equal(x.idx, y.idx) and torch.equal(x.plan.boxes, y.plan.boxes) for x, y in zip(a, b))
    assert not torch.equal(a[0].idx, c[0].idx)


class Recorder(torch.nn.Module):
    """Wraps a model and keeps a copy of every input it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("world", [1, 2])
def test_teacher_labels_the_very_crop_the_student_sees(world):
    torch.manual_seed(0)
    images = _images(12)
    teacher = Recorder(frozen(create_model("resnet18", 4, width=0.125)))
    student = create_model("resnet18", 4, width=0.125)
    seen = []
    student.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    opt = make_optimizer(student, CFG)
    batches = epoch_batches(len(images), CFG, SIZE, seed=0, epoch=0)
    for rank in range(world):
        rows, w = rank_rows(5, rank, world)
        teacher.inputs.clear()
        seen.clear()
        for sb in batches:
            _, target = train_step(student, teacher, opt, images, sb, rows, w, CFG, SIZE, MEAN, STD)
            assert target.shape == (len(rows), 4)
        assert len(teacher.inputs) == len(seen) == len(batches)
        for t_in, s_in, sb in zip(teacher.inputs, seen, batches):
            assert torch.equal(t_in, s_in)  # the same tensor, crop for crop
            plain = normalize(to_float(images[sb.idx[rows]]), MEAN, STD)
            assert t_in.shape == plain.shape
            assert (t_in - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every crop is augmented


def test_stored_soft_labels_give_the_online_targets_and_crops(tmp_path):
    torch.manual_seed(0)
    images = _images(12)
    teacher = frozen(create_model("resnet18", 4, width=0.125))
    online = epoch_batches(len(images), CFG, SIZE, seed=0, epoch=0)
    student = create_model("resnet18", 4, width=0.125)
    opt = make_optimizer(student, CFG)
    recorded, targets = [], []

    def on_step(s, sb, target):
        recorded.append(soft_label_rows(0, s, sb, rows, target, CFG.temperature, k=4))
        targets.append(target)

    for rank in range(2):  # two writers, as two Ray Train workers would be
        rows, w = rank_rows(5, rank, 2)
        recorded.clear()
        run_epoch(student, teacher, opt, images, online, rows, w, CFG, SIZE, MEAN, STD, step=0, total_steps=8,
                  on_step=on_step)
        write_soft_labels(str(tmp_path), 0, rank, {c: np.concatenate([r[c] for r in recorded]) for c in recorded[0]},
                          k=4)
    stored = stored_batches(str(tmp_path), 0, num_classes=4, temperature=CFG.temperature)
    assert len(stored) == len(online)
    for s, (a, b) in enumerate(zip(online, stored)):
        assert torch.equal(a.idx, b.idx)
        assert torch.equal(make_crops(images, a.plan, SIZE, MEAN, STD), make_crops(images, b.plan, SIZE, MEAN, STD))
        # online targets of step s: rank 0's rows then rank 1's
        want = torch.cat([targets[s], targets[len(online) + s]])
        p_online = F.softmax(want / CFG.temperature, dim=1)
        p_stored = F.softmax(b.targets / CFG.temperature, dim=1)
        torch.testing.assert_close(p_stored, p_online, atol=2e-3, rtol=0)  # float16 storage


@pytest.mark.parametrize("mix", ["cutmix", "none"])
def test_a_set_kept_encoded_trains_exactly_as_the_decoded_set(tmp_path, mix):
    """Workers of large sets decode each batch on demand; the student must not notice."""
    store = ShardStore(str(tmp_path))
    store.open("fp")
    store.write_shard("a", [i % 4 for i in range(12)], [i // 4 for i in range(12)], _images(12))
    cfg = dataclasses.replace(CFG, mix=mix, epochs=2)
    info = load_split("synthetic", "test", None, SIZE).info
    decoded, labels = dist_train.read_images(store.root, images_digest(store.read()[0]), 0, "cpu")
    encoded, encoded_labels = dist_train.read_images(store.root, images_digest(decoded), 0, "cpu", keep_encoded=True)
    assert isinstance(decoded, torch.Tensor) and isinstance(encoded, EncodedImages)
    assert labels.tolist() == encoded_labels.tolist() == store.read()[1].tolist()
    for world in (1, 2):
        students = []
        for images in (decoded, encoded):
            torch.manual_seed(0)
            teacher = frozen(create_model("resnet18", 4, width=0.125))
            tr = PostTrainer(cfg, images, teacher, info, image_size=SIZE, small_input=True, seed=0, rank=world - 1,
                             world=world)
            tr.fit()
            students.append(torch.cat([p.flatten() for p in tr.student.state_dict().values()]))
        assert torch.equal(students[0], students[1])
    with pytest.raises(RuntimeError, match="other images"):
        dist_train.read_images(store.root, "0" * 16, 1, "cpu", keep_encoded=True)


# --- Ray Train ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    test = load_split("synthetic", "test", None, SIZE)
    info = test.info
    store = ShardStore(str(root / "distilled"))
    store.open("fp")
    images = _images(12)
    store.write_shard("a", [i % info.num_classes for i in range(12)], [i // info.num_classes for i in range(12)],
                      images)
    images, _, _ = store.read()
    torch.manual_seed(0)
    t = create_model("resnet18", info.num_classes, width=0.125)
    save_checkpoint(str(root / "t.pt"), t, arch="resnet18", width=0.125, num_classes=info.num_classes, image_size=SIZE,
                    small_input=True, mean=info.mean, std=info.std, method="supervised")
    return PosttrainJob(source=store.root, images_digest=images_digest(images), num_images=12,
                        teacher=load_checkpoint(str(root / "t.pt")), test=test, info=info,
                        cfg=dataclasses.replace(CFG, eval_every=3), image_size=SIZE, small_input=True, seed=0)


def crash_after_epoch_2(config):
    """The worker loop, dying right after epoch 2's checkpoint is reported (as a lost node would)."""
    import ray.train

    report = ray.train.report

    def report_then_crash(metrics, **kw):
        report(metrics, **kw)
        if metrics["epoch"] == 2:
            raise RuntimeError("injected failure after epoch 2")

    ray.train.report = report_then_crash  # this worker process only
    dist_train.train_loop_per_worker(config)


@pytest.fixture(scope="module")
def crashed_run(ray_session, job, tmp_path_factory):
    """A real Ray Train run of `job` whose worker died right after epoch 2's checkpoint (copy before changing it)."""
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path
    root = tmp_path_factory.mktemp("crashed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist_train, "train_loop_per_worker", crash_after_epoch_2)
        with pytest.raises(EngineError, match="injected failure after epoch 2"):
            run_posttrain(job, storage_path=str(root), name="run", num_workers=1)
    assert sorted(p.name for p in (root / "run").iterdir() if p.name.startswith("epoch-")) == [
        "epoch-00001", "epoch-00002"]
    return root / "run"


def test_interrupted_posttrain_resumes_and_stops_at_the_planned_epochs(job, crashed_run, tmp_path):
    shutil.copytree(crashed_run, tmp_path / "run")
    before = dist_train.load_state_file(str(tmp_path / "run" / "epoch-00002" / dist_train.STATE_FILE))
    t0 = time.time()
    res = run_posttrain(job, storage_path=str(tmp_path), name="run", num_workers=1)
    wall = time.time() - t0
    per_epoch = steps_per_epoch(12, 5)
    assert res.resumed_from == 2
    assert res.trained_epochs == [1, 2, 3, 4]  # epochs 1-2 before the crash, 3-4 after: none twice, none more
    assert res.epochs == 4 and res.steps == 4 * per_epoch
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    assert [h["epoch"] for h in res.history if "top1" in h] == [3, 4]  # --eval-every 3, and at the end
    assert 0 <= res.top1 <= 100 and res.top1 == res.history[-1]["top1"]
    kept = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("epoch-"))
    assert kept == ["epoch-00003", "epoch-00004"]  # the last two checkpoints
    again = run_posttrain(job, storage_path=str(tmp_path), name="run", num_workers=1)  # finished: nothing to do
    # its seconds count the crashed process's time to its checkpoint too, and a finished run reports them again
    assert before["elapsed_seconds"] > 0 and before["elapsed_seconds"] < res.seconds <= before["elapsed_seconds"] + wall
    assert again.trained_epochs == [1, 2, 3, 4] and again.top1 == res.top1 and again.seconds == res.seconds


def test_a_resumed_run_counts_the_time_before_this_call_once():
    """A checkpoint of an earlier call carries all its time; a worker Ray Train restarted within this call
    resumes a checkpoint of this call, whose time the call's own clock already counts."""
    assert dist_train._elapsed_before({"epoch": 0}, call_t0=100.0) == 0.0  # fresh
    earlier = {"elapsed_seconds": 250.0, "elapsed_before": 40.0, "call_t0": 90.0}
    assert dist_train._elapsed_before(earlier, call_t0=100.0) == 250.0
    assert dist_train._elapsed_before({**earlier, "call_t0": 100.0}, call_t0=100.0) == 40.0


def test_a_posttrain_run_ray_train_cannot_resume_is_cleaned_or_started_over(crashed_run, tmp_path, monkeypatch):
    """What Ray Train registered (read through its public Result API) is kept; a checkpoint it never registered
    is removed; a damaged or planted registered state, or an unreadable record, starts the student over."""
    from test_reliability import plant

    run, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(crashed_run, run)
    before = sorted(os.listdir(run))
    monkeypatch.chdir(tmp_path)  # as `distill --out RELATIVE` names it: a sound run is kept as it is
    dist_train.clean_run_dir("run")
    assert sorted(os.listdir(run)) == before
    (run / "epoch-00003").mkdir()  # a checkpoint a kill interrupted before Ray Train registered it
    (run / "epoch-00003" / dist_train.STATE_FILE).write_bytes(b"cut short")
    dist_train.clean_run_dir(str(run))
    assert sorted(os.listdir(run)) == before  # what Ray Train resumes from, and nothing it did not register
    plant(run / "epoch-00002" / dist_train.STATE_FILE, marker)  # the checkpoint it would resume from, replaced
    dist_train.clean_run_dir(str(run))
    assert not run.exists() and not marker.exists()  # never loaded: the student trains from the start
    shutil.copytree(crashed_run, run)
    for f in run.iterdir():  # Ray Train's own record of its checkpoints, cut short by a full disk
        if f.is_file() and f.suffix == ".json":
            f.write_text(f.read_text()[:10])
    dist_train.clean_run_dir(str(run))
    assert not run.exists()


def test_hard_label_loss_is_the_mixed_cross_entropy():
    from scdd_ray.core.relabel import CropPlan, hard_label_loss, mix_weight

    torch.manual_seed(0)
    logits, y, partner = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), torch.tensor([4, 0, 2, 1])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    want = -np.mean(0.7 * np.log(p[np.arange(4), y.numpy()]) + 0.3 * np.log(p[np.arange(4), partner.numpy()]))
    assert float(hard_label_loss(logits, y, partner, 0.7)) == pytest.approx(want, rel=1e-5)
    boxes = torch.zeros(4, 4)
    assert mix_weight(CropPlan(boxes, torch.zeros(4, dtype=torch.bool), "cutmix", box=(0, 4, 0, 8)), 16) == 1 - 32 / 256
    assert mix_weight(CropPlan(boxes, torch.zeros(4, dtype=torch.bool), "mixup", lam=0.25), 16) == 0.25
    assert mix_weight(CropPlan(boxes, torch.zeros(4, dtype=torch.bool)), 16) == 1.0


def test_hard_label_posttrain_needs_no_teacher_and_learns_the_labels():
    from scdd_ray.core.posttrain import PostTrainer

    test = load_split("synthetic", "train", None, SIZE)  # learn and check on the same images: it must fit them
    cfg = dataclasses.replace(CFG, labels="hard", epochs=12, batch_size=24, lr=5e-3, mix="none")
    trainer = PostTrainer(cfg, test.images, None, test.info, image_size=SIZE, small_input=True, seed=0,
                          labels=test.labels)
    losses = []
    trainer.fit(on_epoch=lambda e, running, steps: losses.append(float(running) / steps))
    assert losses[-1] < 0.5 * losses[0]
    from scdd_ray.core.evaluation import top1

    assert top1(trainer.student, test, test.info.mean, test.info.std) > 60
    with pytest.raises(ValueError, match="needs the images' labels"):
        PostTrainer(cfg, test.images, None, test.info, image_size=SIZE, small_input=True, seed=0)


def test_padded_crops_are_whole_pixel_shifts_with_black_padding():
    cfg = dataclasses.replace(CFG, crop="padded", flip=False, mix="none")
    images = _images(6)
    plan = plan_crops(6, cfg, SIZE, torch.Generator().manual_seed(0))
    crops = make_crops(images, plan, SIZE, (0.0,) * 3, (1.0,) * 3)  # identity normalisation: pixels in [0, 1]
    padded = F.pad(to_float(images), (4, 4, 4, 4))
    shifts = ((plan.boxes[:, 2:] - 0.5) * SIZE).round().long()
    assert shifts.abs().max() <= 4 and len({tuple(s) for s in shifts.tolist()}) > 1
    for i, (dx, dy) in enumerate(shifts.tolist()):
        want = padded[i, :, 4 + dy:4 + dy + SIZE, 4 + dx:4 + dx + SIZE]
        torch.testing.assert_close(crops[i], want, atol=1e-5, rtol=0)


def test_batch_per_worker_scales_the_global_batch_and_the_lr():
    per = dataclasses.replace(CFG, batch_per_worker=True)
    assert [global_batch(CFG, 12, w) for w in (1, 2, 3)] == [5, 5, 5]  # default: one global batch
    assert [global_batch(per, 12, w) for w in (1, 2, 3)] == [5, 10, 12]  # at most the set
    assert scaled_lr(CFG, 4) == CFG.lr and scaled_lr(per, 1) == CFG.lr
    assert scaled_lr(per, 4) == pytest.approx(2 * CFG.lr)  # AdamW: square-root rule
    assert scaled_lr(dataclasses.replace(per, optimizer="sgd"), 4) == pytest.approx(4 * CFG.lr)  # SGD: linear
    batches = epoch_batches(12, per, SIZE, seed=0, epoch=0, world=2)
    assert [len(b.idx) for b in batches] == [10]
    assert [len(rank_rows(10, r, 2)[0]) for r in range(2)] == [5, 5]  # batch_size images on each worker
    assert dataclasses.replace(CFG, batch_per_worker=False) == CFG


def test_batch_per_worker_on_two_ray_train_workers(ray_session, job, tmp_path):
    per_job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, batch_per_worker=True))
    assert per_job.fingerprint() != job.fingerprint()
    res = run_posttrain(per_job, storage_path=str(tmp_path), name="run", num_workers=2)
    assert res.steps == 4 * steps_per_epoch(12, 10) == 4  # global batch 2 x 5 of 12 images: one step per epoch
    lr = res.history[0]["lr"]  # after step 1 of 4, with AdamW's lr scaled by sqrt(2)
    assert lr == pytest.approx(cosine_lr(job.cfg.lr * 2 ** 0.5, 1, 4))
    assert (tmp_path / "run-w2").is_dir()  # another worker count is another run, never resumed from this one
    assert 0 <= res.top1 <= 100


# --- the authors' CIFAR post-training: a longer cosine, the teacher's BatchNorm on batch statistics -------

def test_cosine_period_ends_the_rate_where_the_authors_schedule_does():
    # the authors' CIFAR scripts: 0.5 (1 + cos(pi e / 600)) over 200 epochs, i.e. a period 3x the run
    assert cosine_lr(1.0, 0, 200, period=3.0) == 1.0
    assert cosine_lr(1.0, 200, 200, period=3.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))  # 0.75
    assert cosine_lr(1.0, 100, 200, period=3.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 100 / 600)))
    assert cosine_lr(1.0, 200, 200) == pytest.approx(0.0)  # period 1: to zero, as before
    tr = PostTrainer(dataclasses.replace(CFG, cosine_period=3.0), _images(12), None, _info(), image_size=SIZE,
                     small_input=True, seed=0, labels=torch.arange(12) % 4)
    tr.state["step"] = tr.total_steps
    assert tr.lr() == pytest.approx(CFG.lr * 0.75)


def test_teacher_bn_train_labels_with_each_batch_own_statistics():
    torch.manual_seed(0)
    teacher = frozen(create_model("resnet18", 4, width=0.125))
    for m in teacher.modules():  # running statistics far from any batch's: the two modes differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
    crops = torch.randn(6, 3, SIZE, SIZE)
    evaluated = soft_labels(teacher, crops, "eval")
    batch = soft_labels(teacher, crops, "train")
    by_hand = torch.nn.functional.batch_norm  # the same model with every BN on the crops' own statistics
    twin = copy.deepcopy(teacher)
    for m in twin.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.forward = (lambda mod: lambda x: by_hand(x, None, None, mod.weight, mod.bias, True, 0.0, mod.eps))(m)
    torch.testing.assert_close(batch, twin(crops).float())
    assert not torch.allclose(evaluated, batch, atol=1e-3)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_posttrain_options_are_validated():
    from scdd_ray.config import build_distill_config
    from scdd_ray.errors import ConfigError

    for key, value in (("posttrain.cosine_period", 0.5), ("posttrain.teacher_bn", "frozen")):
        with pytest.raises(ConfigError, match=key):
            build_distill_config("synthetic", "out", {key: value})
    # at their defaults they leave every earlier post-train's fingerprint as it was
    cfg = build_distill_config("synthetic", "out", {"posttrain.cosine_period": 1.0, "posttrain.teacher_bn": "eval"})
    assert "cosine_period" not in fingerprint_view(cfg.posttrain) and "teacher_bn" not in fingerprint_view(cfg.posttrain)
    assert "teacher_bn" in fingerprint_view(dataclasses.replace(cfg.posttrain, teacher_bn="train"))
