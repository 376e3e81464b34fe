import pytest
import torch
import torch.nn as nn

from scdd_ray.bn import BNMatch, batch_stats, bn_layers, bn_loss, parse_bn_weights


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
