import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scdd_ray.core.bn import (
    BNMatch,
    batch_stats,
    bn_layers,
    bn_loss,
    bn_statistics,
    histogram_entropy,
    parse_bn_weights,
    summarize_bn,
)
from scdd_ray.models.factory import create_model
from scdd_ray.models.runtime import frozen


class TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn1(self.conv(x))
        return self.bn2(torch.relu(h))


def _set_running_to_batch(model, x):
    """Put each BN layer's running stats at the batch statistics of its input."""
    stats = []
    hooks = [m.register_forward_hook(lambda m, i, o: stats.append(batch_stats(i[0]))) for m in bn_layers(model)]
    model.eval()
    # Sequentially, since layer 2's input depends on layer 1's running stats.
    for idx, layer in enumerate(bn_layers(model)):
        stats.clear()
        with torch.no_grad():
            model(x)
        mean, var = stats[idx]
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    for h in hooks:
        h.remove()


def test_bn_loss_zero_when_running_stats_are_the_batch_stats():
    torch.manual_seed(0)
    model = TwoBN()
    x = torch.randn(8, 3, 6, 6)
    _set_running_to_batch(model, x)
    assert bn_loss(model, x).item() == pytest.approx(0.0, abs=1e-5)


def test_bn_loss_grows_as_statistics_move_apart():
    torch.manual_seed(0)
    model = TwoBN()
    x = torch.randn(8, 3, 6, 6)
    _set_running_to_batch(model, x)
    losses = []
    for shift in (0.0, 0.5, 1.0, 2.0):
        losses.append(bn_loss(model, x + shift).item())
    assert losses[0] < 1e-5
    assert all(a < b for a, b in zip(losses, losses[1:]))


def test_bn_loss_matches_hand_computation_for_two_layers():
    torch.manual_seed(1)
    model = TwoBN().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        a = model.conv(x)
        b = torch.relu(model.bn1(a))

    def term(t, bn):
        flat = t.permute(1, 0, 2, 3).reshape(t.shape[1], -1)
        mu = flat.mean(1)
        var = ((flat - mu[:, None]) ** 2).mean(1)  # biased
        return torch.sqrt(((mu - bn.running_mean) ** 2).sum()) + torch.sqrt(((var - bn.running_var) ** 2).sum())

    expected = 3.0 * term(a, model.bn1) + 0.5 * term(b, model.bn2)
    got = bn_loss(model, x, weights=[3.0, 0.5])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # weights=None means all ones
    assert bn_loss(model, x).item() == pytest.approx((term(a, model.bn1) + term(b, model.bn2)).item(), rel=1e-5)


def test_bn_loss_leaves_running_stats_untouched_and_gradients_flow_to_input():
    torch.manual_seed(0)
    model = TwoBN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    bn_loss(model, x).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bnmatch_rejects_wrong_weight_count():
    with pytest.raises(ValueError, match="2 BatchNorm2d"):
        BNMatch(TwoBN(), weights=[1.0, 2.0, 3.0])


@pytest.mark.parametrize("spec,n,expected", [
    ("first:10", 4, [10, 1, 1, 1]),
    ("linear:4,1", 4, [4, 3, 2, 1]),
    ("exp:0.5", 3, [1, 0.5, 0.25]),
    ("1,2,3", 3, [1, 2, 3]),
])
def test_weight_schedules(spec, n, expected):
    assert parse_bn_weights(spec).resolve(n) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["first:", "linear:1", "exp:0", "1,-2", "-1", "abc", "first:a"])
def test_weight_schedule_errors(spec):
    with pytest.raises(ValueError):
        parse_bn_weights(spec)


def test_explicit_list_must_match_layer_count():
    with pytest.raises(ValueError, match="lists 3 weights but the model has 20"):
        parse_bn_weights("1,2,3").resolve(20)


class OneBN(nn.Module):
    def __init__(self, c=5):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(x)


def _two_bn_with_stats(seed: int) -> TwoBN:
    """TwoBN in eval mode with random, non-trivial running statistics."""
    torch.manual_seed(seed)
    model = TwoBN().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model


def test_depth_normalised_variants():
    model = _two_bn_with_stats(2)
    x = torch.randn(6, 3, 5, 5)
    w = [10.0, 1.0]
    assert bn_loss(model, x, w, "mean").item() == pytest.approx(bn_loss(model, x, w).item() / 2, rel=1e-6)
    # "channel": per-channel gaps in units of the running scale, RMS over channels, mean over layers.
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(i[0])) for m in bn_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    expected = 0.0
    for wl, bn, a in zip(w, (model.bn1, model.bn2), acts):
        mu = a.mean(dim=(0, 2, 3))
        var = ((a - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        rv = bn.running_var + 1e-5
        expected += wl * (((mu - bn.running_mean) ** 2 / rv).mean().sqrt() + (((var - bn.running_var) / rv) ** 2).mean().sqrt())
    assert bn_loss(model, x, w, "channel").item() == pytest.approx(expected.item() / 2, rel=1e-5)


def test_channel_normalisation_is_invariant_to_activation_scale():
    torch.manual_seed(3)
    model = OneBN().eval()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 5, 3, 3)
    raw, chan = bn_loss(model, x).item(), bn_loss(model, x, normalize="channel").item()
    k = 30.0  # the same network with activations 30x larger: running stats scale with it
    model.bn.running_mean.mul_(k)
    model.bn.running_var.mul_(k * k)
    assert bn_loss(model, k * x, normalize="channel").item() == pytest.approx(chan, rel=1e-4)
    assert bn_loss(model, k * x).item() > 25 * raw


def test_bn_statistics_and_entropy():
    model = TwoBN()
    model.bn1.running_mean.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    model.bn1.running_var.copy_(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    rows = bn_statistics(model)
    assert [r["name"] for r in rows] == ["bn1", "bn2"] and rows[0]["channels"] == 4
    assert rows[0]["mean_variance"] == pytest.approx(1.25)  # population variance of 0,1,2,3
    assert rows[0]["var_variance"] == pytest.approx(3.0)
    assert rows[1]["mean_variance"] == 0.0 and rows[1]["mean_entropy"] is None  # fresh BN: constant
    g = torch.Generator().manual_seed(0)
    v = torch.rand(400, generator=g)
    assert histogram_entropy(torch.ones(5)) == float("-inf")
    h = histogram_entropy(v)
    assert h == pytest.approx(0.0, abs=0.05)  # U(0,1) has differential entropy 0
    assert histogram_entropy(5 * v) == pytest.approx(h + math.log(5.0), abs=1e-6)
    s = summarize_bn(rows)
    assert s["layers"] == 2 and s["mean_variance"] == pytest.approx(0.625) and s["mean_entropy"] == rows[0]["mean_entropy"]


def test_inspect_bn_cli_writes_groups_and_plot(tmp_path, capsys):
    import json

    from scdd_ray.cli import main
    from scdd_ray.models.checkpoint import save_checkpoint
    from scdd_ray.models.factory import create_model

    paths = []
    for i, scale in enumerate((1.0, 1.0, 3.0)):
        torch.manual_seed(i)
        m = create_model("resnet18", 4, width=0.125)
        for bn in bn_layers(m):
            bn.running_mean.normal_().mul_(scale)
        p = tmp_path / f"b{i}.pt"
        save_checkpoint(str(p), m, arch="resnet18", width=0.125, num_classes=4, image_size=16, small_input=True,
                        mean=(0.5,) * 3, std=(0.5,) * 3, method="simclr" if i < 2 else "supervised")
        paths.append(str(p))
    out = tmp_path / "bn.json"
    assert main(["inspect-bn", "--backbone", paths[0], paths[1], "--compare", paths[2], "--json", str(out),
                 "--plot", str(tmp_path / "bn.png")]) == 0
    res = json.loads(out.read_text())
    a, b = res["groups"]
    assert res["command"].startswith("scdd-ray inspect-bn --backbone ") and "torch" in res["machine"]
    assert (a["label"], len(a["checkpoints"]), b["label"]) == ("simclr", 2, "supervised")
    assert len(a["checkpoints"][0]["layers"]) == 20
    # running_mean ~ N(0, scale^2): the 3x group shows ~9x the across-channel variance
    ratio = b["summary"]["mean_variance"]["mean"] / a["summary"]["mean_variance"]["mean"]
    assert 5 < ratio < 15
    assert (tmp_path / "bn.png").read_bytes()[:4] == b"\x89PNG"
    assert "simclr" in capsys.readouterr().out


def test_channels_last_statistics_match_var_mean_even_far_from_zero():
    g = torch.Generator().manual_seed(0)
    for loc, scale in ((0.0, 1.0), (10.0, 0.1)):
        x = torch.randn(50, 6, 5, 7, generator=g) * scale + loc
        var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        cl = x.contiguous(memory_format=torch.channels_last)
        mean, var = batch_stats(cl, torch.full((6,), loc))  # shifted by a running mean near the batch mean
        assert torch.allclose(mean.double(), mean_ref, atol=1e-5)
        assert torch.allclose(var.double(), var_ref, rtol=1e-4, atol=1e-7)
        m2, v2 = batch_stats(x)  # NCHW: the fused var_mean
        assert torch.allclose(v2.double(), var_ref, rtol=1e-5) and torch.allclose(m2.double(), mean_ref, atol=1e-5)
    # bn_loss does not depend on the activation layout
    model = _two_bn_with_stats(0)
    x = torch.randn(8, 3, 6, 6)
    a = bn_loss(model, x).item()
    b = bn_loss(model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)).item()
    assert a == pytest.approx(b, rel=1e-5)


def test_bn_matching_keeps_no_float32_copy_of_an_activation_for_backward():
    """Under bf16 autocast (what a GPU runs; torch runs it on CPU too) the BN term saves, for backward,
    only the layer's own bf16 input: no upcast, shifted or squared float32 copy."""
    torch.manual_seed(0)
    model = frozen(create_model("resnet18", 4, width=0.25)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    biggest = max(m.num_features for m in bn_layers(model)) * 4  # the largest per-channel vector's numel x 4
    for with_bn in (False, True):
        saved = []
        with BNMatch(model) as bnm, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                              lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), torch.arange(4)) + (bnm.loss() if with_bn else 0)
        big32 = {t.data_ptr() for t in saved if t.dtype == torch.float32 and t.numel() > biggest and t is not x}
        if not with_bn:
            floor = big32
        else:
            assert big32 <= floor, f"{len(big32 - floor)} float32 activation copies kept for backward"
        loss.backward()


def test_batch_moments_gradient_is_exact():
    """The hand-written backward of the BN statistics (both layouts) against autograd in float64."""
    g = torch.Generator().manual_seed(0)
    for cl in (False, True):
        x = (torch.randn(6, 5, 4, 3, generator=g, dtype=torch.float64) * 0.5 + 3).requires_grad_(True)
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x
        shift = torch.randn(5, generator=g, dtype=torch.float64) * 0.1 + 3
        wm, wv = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
        mean, var = batch_stats(xin.float(), shift.float())
        ((mean.double() * wm).sum() + (var.double() * wv).sum()).backward()
        ours = x.grad.clone()
        x.grad = None
        v64, m64 = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        ((m64 * wm).sum() + (v64 * wv).sum()).backward()
        torch.testing.assert_close(ours, x.grad, rtol=1e-4, atol=1e-5)


def _matched(model, x, fused: bool):
    """(logits, loss, input gradient) of CE + BN matching, through the fused frozen layers or the hooks."""
    xi = x.clone().requires_grad_(True)
    bnm = BNMatch(model)
    if not fused:  # a forward of the instance's own: BNMatch leaves such a layer to its forward hook
        for m in bn_layers(model):
            m.forward = type(m).forward.__get__(m)
    with bnm:
        out = model(xi)
        loss = F.cross_entropy(out, torch.arange(len(x)) % 4) + 0.1 * bnm.loss()
    if not fused:
        for m in bn_layers(model):
            del m.forward
    loss.backward()
    return out.detach(), loss.detach(), xi.grad


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_frozen_layer_matched_in_one_function_equals_its_own_forward_and_a_hook(layout):
    torch.manual_seed(0)
    model = frozen(create_model("resnet18", 4, width=0.25)).to(memory_format=layout)
    for m in bn_layers(model):
        m.running_mean.normal_(0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.normal_(0, 0.2)
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=layout)
    out, loss, grad = _matched(model, x, fused=True)
    ref_out, ref_loss, ref_grad = _matched(model, x, fused=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert grad.is_contiguous(memory_format=layout)
    assert all("forward" not in m.__dict__ for m in bn_layers(model))  # the class's forward again after


def test_layers_that_train_are_matched_by_hooks_and_keep_their_own_forward():
    model = TwoBN()  # parameters that train: the fused frozen form would drop their gradients
    model.eval()
    with BNMatch(model) as bnm:
        assert all("forward" not in m.__dict__ for m in bn_layers(model))
        model(torch.randn(4, 3, 8, 8))
        assert bnm.loss() > 0
