"""BatchNorm statistics: the BN-matching loss and its per-layer weights.

One implementation (`BNMatch`) serves both `bn_loss` and the recover loop, so
what tests check is exactly what synthesis optimises.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

import torch
import torch.nn as nn

from .augment import to_device


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """Every BatchNorm2d of `model`, in `model.modules()` order."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


class _Moments(torch.autograd.Function):
    """Per-channel mean and biased variance, in float32, of `x` (an (M, C) matrix or an NCHW batch)
    around `shift`, keeping no copy of `x` for backward.

    Forward makes one float32 temporary, d = x - shift, and frees it; backward
    rebuilds the gradient from `x` itself (saved as it is, no upcast, no copy:
    d mean/dx = 1/M, d var/dx = 2 (x - mean) / M) in one fused multiply-add.
    The plain autograd formula would keep the shifted float32 activation of
    every BatchNorm layer alive until backward, and make and hold more
    full-size copies on the way.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor):
        mean, var, count = _moments(x, shift)
        ctx.save_for_backward(x, mean)
        ctx.count = count
        return mean, var

    @staticmethod
    def backward(ctx, g_mean, g_var):
        x, mean = ctx.saved_tensors
        return _moments_grad(x, mean, g_mean, g_var, ctx.count).to(x.dtype), None


def _moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) per channel of an (M, C) or NCHW `x`, in float32, around `shift`."""
    dims, shape = _channel_axes(x)
    count = x.numel() // x.shape[1 if x.dim() == 4 else -1]
    d = x - shift.view(shape)  # float32 (the shift is): the one full-size temporary
    if d.device.type == "cpu":
        # Sums as a matrix-vector product with ones: ~4x faster than sum(0) of an (M, C) view on CPU.
        s1 = _sum(d, dims)
        s2 = _sum(d.square_(), dims)
        md = s1 / count
        var = s2 / count - md * md
    else:  # one fused (Welford) pass on GPUs
        var, md = torch.var_mean(d, dim=dims, correction=0)
    del d
    return md + shift, var, count


def _moments_grad(x: torch.Tensor, mean: torch.Tensor, g_mean, g_var, count: int) -> torch.Tensor:
    """d(mean, var)/dx applied to (g_mean, g_var), float32, shaped as x: one fused multiply-add
    (d mean/dx = 1/M, d var/dx = 2 (x - mean) / M)."""
    _, shape = _channel_axes(x)
    a = (g_var if g_var is not None else torch.zeros_like(mean)) * (2.0 / count)
    c = (g_mean / count if g_mean is not None else torch.zeros_like(mean)) - mean * a
    return torch.addcmul(c.view(shape), x, a.view(shape))


class _FrozenBN(torch.autograd.Function):
    """An eval-mode BatchNorm with frozen parameters, y = x * scale + bias per channel (running statistics
    folded in), and the batch moments of its input, in one function.

    What the recover step runs instead of the layer's own forward (`BNMatch`):
    the layer's backward to its input is then a per-channel scale, added in
    place into the moments' gradient (one pass) instead of a batch-norm backward,
    a second full-size gradient and autograd's sum of the two (three passes).
    A channels_last x is read as an (N*H*W, C) matrix (a view) throughout.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor):
        mean, var, count = _moments(_as_matrix(x), shift)
        # In float32 (scale and bias are), written in the layer's dtype and layout, as the layer's own
        # forward does; a tensor of its own (ReLU may work in place on it).
        y = torch.empty_like(x)
        torch.addcmul(bias.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1), out=y)
        ctx.save_for_backward(x, mean, scale)
        ctx.count = count
        return y, mean, var

    @staticmethod
    def backward(ctx, g_y, g_mean, g_var):
        x, mean, scale = ctx.saved_tensors
        x2 = _as_matrix(x)
        g = _moments_grad(x2, mean, g_mean, g_var, ctx.count)
        if g_y is not None:
            g.addcmul_(_as_matrix(g_y.contiguous(memory_format=_format(x))), scale.view(_channel_axes(x2)[1]))
        return _like(g.to(x.dtype), x), None, None, None


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    """A channels_last NCHW batch as its (N*H*W, C) matrix (a view); any other x as it is."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`t` (computed on `_as_matrix(x)`) back in x's shape and layout (a view)."""
    if t.dim() == 2 and x.dim() == 4:
        n, c, h, w = x.shape
        return t.view(n, h, w, c).permute(0, 3, 1, 2)
    return t


def _channel_axes(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(axes reduced over, shape of a per-channel vector that broadcasts against x) of an (M, C) or NCHW x."""
    if x.dim() == 4:
        return (0, 2, 3), (1, -1, 1, 1)
    return (0,), (-1,)


def _sum(d: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    if d.dim() == 2:
        return (d.new_ones(1, d.shape[0]) @ d).view(-1)
    return d.sum(dims)


def batch_stats(x: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over batch and space, in float32.

    Moments are taken around `shift` (the layer's running mean, close to the
    batch mean), which keeps E[(x - shift)^2] - E[x - shift]^2 free of
    cancellation. A channels_last activation is read as an (N*H*W, C) matrix
    without a copy. Nothing but `x` itself is kept for backward
    (`_Moments`), whatever the activation's dtype: under bf16 autocast no
    float32 copy of any activation outlives its layer's forward.
    """
    c = x.shape[1]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view
    if shift is None:  # the batch mean itself (one more read): the exact two-pass variance
        shift = x.detach().float().mean(_channel_axes(x)[0])
    return _Moments.apply(x, shift.detach().float())


NORMALIZE = ("none", "mean", "channel")


def match_term(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
               normalize: str = "none", eps: float = 1e-5) -> torch.Tensor:
    """||mu - running_mean||_2 + ||var - running_var||_2 for one layer.

    normalize="channel" measures each channel's gap in units of that channel's
    running scale (mean gap / running std, variance gap / running var) and takes
    the RMS over channels, so the term no longer grows with the layer's width
    or with the magnitude of its activations.
    """
    if normalize == "channel":
        c = mean.numel() ** 0.5
        return (torch.linalg.vector_norm((mean - running_mean) / (running_var + eps).sqrt()) / c
                + torch.linalg.vector_norm((var - running_var) / (running_var + eps)) / c)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def smoothed(state: dict, key, current: tuple[torch.Tensor, ...], momentum: float) -> tuple[torch.Tensor, ...]:
    """The statistics a smoothed (flat) objective matches: their moving average over the iterations so far,
    carrying the current iteration's gradient (value m * average + (1 - m) * current, gradient of the current
    term as if unsmoothed). EDC's flatness regularisation; `state[key]` keeps the average, the first call
    starts it at the current values."""
    prev = state.get(key)
    avg = tuple(c.detach() if p is None else momentum * p + (1 - momentum) * c.detach()
                for c, p in zip(current, prev or (None,) * len(current)))
    state[key] = avg
    return tuple(a + c - c.detach() for a, c in zip(avg, current))


class BNMatch:
    """Context manager that records each BN layer's matching term during a forward.

    with BNMatch(model, weights) as m:
        logits = model(x)
        loss = ce(logits, y) + alpha * m.loss()

    normalize: "none" sums the weighted layer terms (the paper's loss);
    "mean" divides that sum by the number of layers; "channel" also normalises
    each layer's term per channel (see `match_term`). The last two make one
    aim to let one coefficient transfer across depths (measured in docs/benchmarks.md).
    """

    def __init__(self, model: nn.Module, weights=None, normalize: str = "none", momentum: float = 0.0):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)} (got {normalize!r})")
        self.normalize = normalize
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError("model has no BatchNorm2d layer to match")
        n = len(self.layers)
        w = [1.0] * n if weights is None else [float(v) for v in weights]
        if len(w) != n:
            raise ValueError(f"got {len(w)} BN-layer weights but the model has {n} BatchNorm2d layers")
        self._weights = torch.tensor(w, dtype=torch.float32)
        self._weights_on: dict[torch.device, torch.Tensor] = {}  # one copy per device, not one per iteration
        self._terms: list[torch.Tensor | None] = [None] * n
        self._handles: list = []
        self.momentum = momentum
        self._smoothed: dict = {}
        self._swapped: list[nn.BatchNorm2d] = []

    def _fused(self, idx: int, module: nn.BatchNorm2d):
        """The layer's forward while matching: `_FrozenBN` (its output, and the batch moments of its input)."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            rm, rv = module.running_mean.float(), module.running_var.float()
            scale = torch.rsqrt(rv + module.eps)
            if module.weight is not None:
                scale = scale * module.weight.float()
            bias = -rm * scale
            if module.bias is not None:
                bias = bias + module.bias.float()
            y, mean, var = _FrozenBN.apply(x, scale, bias, rm)
            if self.momentum > 0:
                mean, var = smoothed(self._smoothed, idx, (mean, var), self.momentum)
            self._terms[idx] = match_term(mean, var, rm, rv, self.normalize)
            return y
        return forward

    def _hook(self, idx: int):
        def record(module: nn.BatchNorm2d, inputs, output):
            rm = module.running_mean.float()
            mean, var = batch_stats(inputs[0], rm)
            if self.momentum > 0:
                mean, var = smoothed(self._smoothed, idx, (mean, var), self.momentum)
            self._terms[idx] = match_term(mean, var, rm, module.running_var.float(), self.normalize)
        return record

    def __enter__(self) -> "BNMatch":
        """Frozen eval-mode layers (what recover matches) run `_FrozenBN` instead of their forward; any
        other layer, or one another BNMatch already runs, is matched by a forward hook."""
        for i, m in enumerate(self.layers):
            if _fusable(m):
                m.forward = self._fused(i, m)
                self._swapped.append(m)
            else:
                self._handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for m in self._swapped:
            del m.forward  # the class's forward again
        self._handles, self._swapped = [], []
        self._terms = [None] * len(self.layers)
        self._smoothed = {}

    def weights_on(self, device) -> torch.Tensor:
        """The layer weights on `device` ("cuda" means the current GPU), copied there once."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._weights_on:
            self._weights_on[device] = to_device(self._weights, device)
        return self._weights_on[device]

    def terms(self) -> torch.Tensor:
        """Unweighted per-layer terms of the latest forward, shape (L,)."""
        if any(t is None for t in self._terms):
            raise RuntimeError("no forward pass recorded every BatchNorm2d layer")
        return torch.stack(self._terms)

    def loss(self) -> torch.Tensor:
        t = self.terms()
        total = (t * self.weights_on(t.device)).sum()
        return total if self.normalize == "none" else total / len(self.layers)


def _fusable(m: nn.BatchNorm2d) -> bool:
    """An eval-mode layer normalising with running statistics, no parameter trained, its own forward."""
    return (not m.training and m.track_running_stats and m.running_mean is not None
            and not any(p.requires_grad for p in m.parameters()) and "forward" not in m.__dict__)


def bn_loss(model: nn.Module, x: torch.Tensor, weights=None, normalize: str = "none") -> torch.Tensor:
    """sum_l w_l (||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2).

    `model` should be in eval mode so the forward normalises with the running
    statistics and leaves them untouched. `normalize` other than "none" gives
    the depth-normalised variants of `BNMatch`.
    """
    with BNMatch(model, weights, normalize) as m:
        model(x)
        return m.loss()


# --- layer-weight schedules -------------------------------------------------

@dataclass(frozen=True)
class WeightSpec:
    kind: str  # first | linear | exp | list
    params: tuple[float, ...]

    def resolve(self, num_layers: int) -> list[float]:
        """Concrete weights for a model with `num_layers` BatchNorm2d layers."""
        n = num_layers
        if self.kind == "first":
            return [self.params[0]] + [1.0] * (n - 1)
        if self.kind == "linear":
            a, b = self.params
            return [a + (b - a) * (i / (n - 1) if n > 1 else 0.0) for i in range(n)]
        if self.kind == "exp":
            return [self.params[0] ** i for i in range(n)]
        if len(self.params) != n:
            raise ValueError(f"`recover.bn_weights` lists {len(self.params)} weights but the model has {n} BatchNorm2d layers")
        return list(self.params)


_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


def parse_bn_weights(spec: str) -> WeightSpec:
    """Parse `first:M`, `linear:A,B`, `exp:G`, or `w1,w2,...`; weights must be >= 0."""
    s = spec.strip().lower() if isinstance(spec, str) else ""

    def nums(text: str) -> tuple[float, ...]:
        parts = [p.strip() for p in text.split(",")]
        if not parts or not all(re.fullmatch(_NUM, p) for p in parts):
            raise ValueError(f"expected non-negative numbers in {spec!r} "
                             "(forms: first:M, linear:A,B, exp:G, w1,w2,...)")
        return tuple(float(p) for p in parts)

    if s.startswith("first:"):
        p = nums(s[6:])
        if len(p) != 1:
            raise ValueError(f"first: takes one multiplier (got {spec!r})")
        return WeightSpec("first", p)
    if s.startswith("linear:"):
        p = nums(s[7:])
        if len(p) != 2:
            raise ValueError(f"linear: takes two weights A,B (got {spec!r})")
        return WeightSpec("linear", p)
    if s.startswith("exp:"):
        p = nums(s[4:])
        if len(p) != 1 or p[0] <= 0:
            raise ValueError(f"exp: takes one positive gamma (got {spec!r})")
        return WeightSpec("exp", p)
    if s.startswith("-") or re.search(r"(^|,)\s*-", s):
        raise ValueError(f"weights must be non-negative (got {spec!r})")
    p = nums(s)
    if not all(math.isfinite(v) for v in p):
        raise ValueError(f"weights must be finite (got {spec!r})")
    return WeightSpec("list", p)


# --- inspection ---------------------------------------------------------------

def histogram_entropy(values: torch.Tensor, bins: int | None = None) -> float:
    """Differential entropy estimate (nats) of a 1-D sample from an equal-width histogram.

    H ~= -sum_i p_i log(p_i / width), with sqrt(n) bins over the sample's range.
    Unlike the discrete entropy of the bin counts it grows with the spread of
    the values (a sample scaled by k gains log k), which is what comparing how
    much the statistics vary across channels needs.
    """
    v = values.detach().double().flatten()
    n = v.numel()
    lo, hi = float(v.min()), float(v.max())
    if n < 2 or hi - lo <= 0:
        return float("-inf")
    k = bins or max(2, int(round(math.sqrt(n))))
    counts = torch.histc(v, bins=k, min=lo, max=hi)
    p = counts[counts > 0] / n
    width = (hi - lo) / k
    return float(-(p * torch.log(p / width)).sum())


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no -inf


def bn_statistics(model: nn.Module) -> list[dict]:
    """Per BatchNorm2d layer: how much its running statistics vary across channels.

    For running_mean and running_var: the across-channel (population)
    variance and a histogram entropy estimate. Layers in `model.modules()` order.
    """
    names = {m: n for n, m in model.named_modules()}
    rows = []
    for i, layer in enumerate(bn_layers(model)):
        rm, rv = layer.running_mean.detach().double(), layer.running_var.detach().double()
        rows.append({
            "index": i, "name": names[layer], "channels": int(rm.numel()),
            "mean_variance": float(rm.var(correction=0)), "var_variance": float(rv.var(correction=0)),
            "mean_entropy": _finite(histogram_entropy(rm)), "var_entropy": _finite(histogram_entropy(rv)),
        })
    return rows


def summarize_bn(rows: list[dict]) -> dict:
    """Averages over layers of the per-layer figures of `bn_statistics`.

    For each figure: the mean over all layers, the first layer's value (the
    one `first:M` weighs up) and the mean over the other layers, since one
    layer can dominate the average. A layer whose statistic is constant across
    channels (e.g. an untrained one) has no entropy (None) and is left out of
    entropy averages, which are None when no layer has one.
    """
    def avg(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    out: dict = {}
    for k in ("mean_variance", "var_variance", "mean_entropy", "var_entropy"):
        vals = [r[k] for r in rows]
        out[k] = avg(vals)
        out[f"{k}_first"] = vals[0] if vals else None
        out[f"{k}_rest"] = avg(vals[1:])
    return out | {"layers": len(rows)}


def aggregate_summaries(summaries: list[dict]) -> dict:
    """Mean and sample std over several checkpoints (e.g. seeds) of each `summarize_bn` figure."""
    agg = {}
    for k in (k for k in summaries[0] if k != "layers"):
        vals = [s[k] for s in summaries if s[k] is not None]
        agg[k] = {"mean": statistics.fmean(vals) if vals else None,
                  "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return agg
