"""Feature learning per layer during training: how much of the output's change the hidden features cause.

For every width, K replicas (one seed each) train on the same batches with a learning rule; after
the recorded steps t we measure on a fixed probe batch, per replica (then averaged over replicas):

==================  ===========================================================================
name                quantity
==================  ===========================================================================
``share``           rms(W_L(t) [h_{L-1}(t) - h_{L-1}(0)]) / rms(f(t) - f(0)): the fraction of the
                    output's change caused by the last hidden layer's features moving
``share_init``      rms(W_L(0) [h_{L-1}(t) - h_{L-1}(0)]) / rms(f(t) - f(0)): the first-order part
``share_dW``        rms((W_L(t) - W_L(0)) [h_{L-1}(t) - h_{L-1}(0)]) / rms(f(t) - f(0)): the rest,
                    second order in the learning rate (the readout reading the moved features)
``df``              rms(f(t) - f(0))
``feat``            rms(W_L(t) [h_{L-1}(t) - h_{L-1}(0)])  (the feature part, numerator of ``share``)
``read``            rms((W_L(t) - W_L(0)) h_{L-1}(0) + b_L(t) - b_L(0))  (the readout part)
``dh_rel_l``        ||h_l(t) - h_l(0)|| / ||h_l(0)||, hidden layers l = 1..L-1 (Frobenius over the
                    probe batch and features)
``dW_rel_l``        ||W_l(t) - W_l(0)|| / ||W_l(0)||, every layer l = 1..L (Frobenius)
==================  ===========================================================================

W_L is applied as the layer applies it (its muP forward multiplier included), so that exactly

    f(t) - f(0) = W_L(t) [h_{L-1}(t) - h_{L-1}(0)] + (W_L(t) - W_L(0)) h_{L-1}(0) + b_L(t) - b_L(0),

i.e. ``df`` is the RMS of the sum of the vectors whose RMS are ``feat`` and ``read``;
``FeatureResult.identity_residual`` records the largest violation relative to rms(df) (float rounding).

Why it matters (TP's muP, arXiv 2411.02001): hidden targets come through the feedback, not through
W_L, so W_L and Delta h_{L-1} are uncorrelated and W_L Delta h_{L-1} sums M uncorrelated terms. With
b_L = 1/2 (W_L ~ M^{-1/2}) that is Theta(1): the share keeps a width-independent value (feature
learning); with b_L = 1 it vanishes like M^{-1/2} and at large width only the readout learns. Under
BP's muP (b_L = 1) Delta h_{L-1} is aligned with W_L and the share stays Theta(1) too.

Two finite-size caveats. The share is feat / rms(feat + read), bounded by about 1: under b_L = 1 it
follows M^{-1/2} only once feat << read, i.e. for widths well above the base width (where b_L = 1/2 and
b_L = 1 coincide). And (W_L(t) - W_L(0)) Delta h_{L-1} is Theta(1) under b_L = 1 too (the readout's own
update is correlated with the features it reads), so after many steps or at a large learning rate
``share`` flattens while ``share_init`` keeps the M^{-1/2} law. With ridge feedback (the batch optimum,
which inverts the forward map) b_L = 1 fails differently: the small output makes the hidden targets grow
with width, so ``dh_rel_l`` grows and the share stays flat.

Each quantity's log-log width slope is fitted at the last recorded step (``slopes``, on the replica
means) and per replica (``slope_se``: the standard error of the replica slopes' mean).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..nets import Net
from ..optim import LayerwiseOptimizer
from .excess import rms
from .measure import norm, own_update
from .slopes import fit_slope


@dataclass
class FeatureResult:
    widths: list[int]
    steps: list[int]  # the recorded steps (1 = after the first update)
    values: dict[str, list[list[float]]]  # name -> [width][recorded step], mean over replicas
    per_replica: dict[str, list[list[list[float]]]]  # name -> [width][recorded step][replica]
    depth: int
    identity_residual: float = 0.0  # max |df - feat - read| / rms(df) over widths, steps, replicas
    slopes: dict[str, float] = field(default_factory=dict)  # width slope at the last recorded step
    slope_se: dict[str, float] = field(default_factory=dict)  # standard error from the replicas' slopes
    slopes_per_step: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self):
        for name, table in self.values.items():
            arr = np.asarray(table, dtype=float)  # (widths, steps)
            self.slopes_per_step[name] = [fit_slope(self.widths, arr[:, t]) for t in range(arr.shape[1])]
            self.slopes[name] = self.slopes_per_step[name][-1]
            rep = np.asarray(self.per_replica[name], dtype=float)[:, -1, :]  # (widths, K)
            per = [fit_slope(self.widths, rep[:, k]) for k in range(rep.shape[1])]
            self.slope_se[name] = (float(np.std(per, ddof=1) / math.sqrt(len(per))) if len(per) > 1
                                   else float("nan"))

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def last(self, name: str) -> list[float]:
        """A quantity's replica mean at the last recorded step, one value per width."""
        return [row[-1] for row in self.values[name]]

    def to_dict(self) -> dict:
        from ..util import json_safe
        return json_safe({"widths": self.widths, "steps": self.steps, "depth": self.depth,
                          "identity_residual": self.identity_residual, "slopes": self.slopes,
                          "slope_se": self.slope_se, "slopes_per_step": self.slopes_per_step,
                          "values": self.values, "per_replica": self.per_replica})

    def table(self) -> str:
        names = self.names
        col = max(11, max(len(n) for n in names) + 2)
        head = f"{'width':<8}" + "".join(f"{n:>{col}}" for n in names)
        lines = [f"feature learning after step {self.steps[-1]} (mean over replicas); share = rms(W_L dh_(L-1)) / "
                 f"rms(df)", head, "-" * len(head)]
        for i, w in enumerate(self.widths):
            lines.append(f"{w:<8}" + "".join(f"{self.values[n][i][-1]:>{col}.4g}" for n in names))
        lines.append(f"{'slope':<8}" + "".join(f"{self.slopes[n]:>{col}.3f}" for n in names))
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> str:
        """Every quantity at the last recorded step against width (log-log), its slope in the legend."""
        from ..plots import plot_lines
        series = {f"{n} ({self.slopes[n]:+.2f})": self.last(n) for n in self.names if n not in ("feat", "read")}
        return plot_lines(path, self.widths, series, "width", f"value after step {self.steps[-1]}",
                          title=title or "feature learning (legend: width slope)", logx=True, logy=True)


@torch.no_grad()
def _measure(net: Net, w0, b0, acts0, f0, probe) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    us, acts = net.forward(probe)
    L = net.depth
    out_layer = net.layers[L - 1]
    out = {}
    dh = acts[L - 1] - acts0[L - 1]
    df = us[-1] - f0
    feat = out_layer.forward(dh, out_layer.weight, False)  # W_L(t) dh_{L-1}, multiplier included
    read = own_update(out_layer, acts0[L - 1], w0[L - 1], b0[L - 1])
    feat0 = out_layer.forward(dh, w0[L - 1], False)  # W_L(0) dh_{L-1}: the first-order part of feat
    out["share"] = rms(feat) / rms(df)
    out["share_init"] = rms(feat0) / rms(df)
    out["share_dW"] = rms(feat - feat0) / rms(df)
    out["df"] = rms(df)
    out["feat"] = rms(feat)
    out["read"] = rms(read)
    for l in range(1, L):
        out[f"dh_rel_{l}"] = norm(acts[l] - acts0[l]) / norm(acts0[l])
    for l in range(1, L + 1):
        out[f"dW_rel_{l}"] = norm(net.layers[l - 1].weight - w0[l - 1]) / norm(w0[l - 1])
    residual = (df - feat - read).detach().flatten(1).double().abs().max(1).values / rms(df)
    return out, residual


def feature_learning(build_net: Callable[[int], Net], algo, widths: Sequence[int], batches: Sequence[tuple],
                     probe: torch.Tensor, lr, optimizer: str = "sgd", momentum: float = 0.0,
                     record: Sequence[int] | None = None) -> FeatureResult:
    """Train at every width and measure feature learning on ``probe`` (see the module docstring).

    ``build_net(width)`` builds a fresh net whose K replicas (seeds) are measured separately and
    averaged; ``algo`` is a learning rule (``make_algo``), run with its ``step`` and the layerwise
    optimizer (``lr``: a base learning rate, or one per replica); ``batches`` the (x, y) training
    batches, one per step, the same at every width (``coord_batches``); ``record`` the steps
    (1-based) after which to measure (default: every step; the last step is always recorded).
    """
    widths = sorted(int(w) for w in widths)
    if len(widths) < 2:
        raise ConfigError("a feature-learning check needs at least two widths")
    n = len(batches)
    if n < 1:
        raise ConfigError("a feature-learning check needs at least one step")
    steps = sorted({int(s) for s in (record or range(1, n + 1))} | {n})
    if steps[0] < 1 or steps[-1] > n:
        raise ConfigError(f"recorded steps must lie in 1..{n}, got {list(record)}")
    values: dict[str, list] = {}
    per_rep: dict[str, list] = {}
    residual = 0.0
    depth = None
    for w in widths:
        net = build_net(w)
        if depth is None:
            depth = net.depth
        opt = LayerwiseOptimizer.for_net(net, lr, optimizer, momentum=momentum)
        w0 = [layer.weight.clone() for layer in net.layers]
        b0 = [None if layer.bias is None else layer.bias.clone() for layer in net.layers]
        with torch.no_grad():
            us0, acts0 = net.forward(probe)
        rows: dict[str, list] = {}
        for t, (x, y) in enumerate(batches, start=1):
            grads, _ = algo.step(net, x, y, opt=opt)
            opt.step(grads)
            if t in steps:
                meas, res = _measure(net, w0, b0, acts0, us0[-1], probe)
                res = res[torch.isfinite(res)]
                if res.numel():
                    residual = max(residual, float(res.max()))
                for name, v in meas.items():
                    rows.setdefault(name, []).append(v.cpu().tolist())
        for name, r in rows.items():
            per_rep.setdefault(name, []).append(r)
            values.setdefault(name, []).append([float(np.mean(v)) for v in r])
    return FeatureResult(widths, steps, values, per_rep, depth, residual)


__all__ = ["FeatureResult", "feature_learning"]
