"""Coordinate check: how the size of each contribution to a training step scales with width.

For every width, K replicas (seeds) take ``steps`` updates on the same batches; after each
update t we measure on a fixed probe batch, per layer l (RMS over coordinates, averaged over
replicas):

=============  ===========================================  =======================
name           quantity                                     muP keeps it Theta(1)
=============  ===========================================  =======================
``h_l``        activity a_l = post(u_l), hidden layers      yes
``dh_l``       a_l(t) - a_l(0)                              yes
``dWh_l``      (W_l(t) - W_l(0)) a_{l-1}(t) (+ bias change)  yes
``Wdh_l``      W_l(0) (a_{l-1}(t) - a_{l-1}(0)), l >= 2     yes
``df``         f(t) - f(0)                                  yes
``f``          f(t)                                         no (vanishes when b_L = 1)
``W_l``        RMS entry of W_l(0) (times its multiplier)   no (it is M^-b_l)
``dW_l``       RMS entry of W_l(t) - W_l(0)                 no
``dWdh_l``     (W_l(t) - W_l(0)) Delta a_{l-1}              no (second order)
=============  ===========================================  =======================

Across depth (``axis="depth"``, residual nets; ``make_net(depth)``): the layers differ from depth to depth, so
the quantities are read at fixed *positions*: ``in`` (layer 1), ``first`` (the first block, layer 2), ``mid``
(block floor(H / 2)), ``last`` (block H - 1), with ``h_P`` the stream u_l(t), ``dh_P`` = u_l(t) - u_l(0) and
``dWh_P`` the layer's own update (W_l(t) - W_l(0)) a_{l-1}(t) (+ bias change; a block's branch multiplier
included), ``dWh_blocks`` the blocks' own updates summed over all H - 2 blocks, plus ``df`` / ``f``; slopes are
per doubling of the depth H. Depth-muP keeps every ``h_P``, ``dh_P``, ``dWh_in``, ``dWh_blocks`` and ``df``
flat (counted); a single block's ``dWh_P`` is ~ 1/(H - 2) by design (each block moves the stream by a share
of the blocks' Theta(1) total; not counted), and ``f`` vanishes or not with b_L as across width.

u_l(t) - u_l(0) = dWh_l + Wdh_l, so the table splits every change into the part caused by the
layer's own update and the part it inherits. Each quantity's log-log slope against width is
fitted per step and on the step-averaged log RMS (``slopes``); ``max_abs_slope`` is the largest
|slope| among the counted quantities. A learning rule can add observables by defining
``coord_observables(net, x, y) -> {name: (K,) tensor}`` and a set ``coord_counted`` of the names
muP keeps Theta(1).
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
from ..streams import generator


def rms(t: torch.Tensor) -> torch.Tensor:
    """Root mean square per replica: (K, ...) -> (K,)."""
    return t.detach().flatten(1).double().pow(2).mean(1).sqrt()


def norm(t: torch.Tensor) -> torch.Tensor:
    """Frobenius norm per replica: (K, ...) -> (K,), float64."""
    return t.detach().flatten(1).double().pow(2).sum(1).sqrt()


def fit_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(width); nan if any value is not positive."""
    v = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(widths, float)), np.log(v), 1)[0])


@dataclass
class CoordResult:
    widths: list[int]  # the values of the axis: widths, or depths with axis="depth"
    steps: int
    rms: dict[str, list[list[float]]]  # name -> [width][step]
    counted: list[str]
    slopes: dict[str, float] = field(default_factory=dict)
    slopes_per_step: dict[str, list[float]] = field(default_factory=dict)
    axis: str = "width"

    def __post_init__(self):
        for name, table in self.rms.items():
            arr = np.asarray(table, dtype=float)  # (widths, steps)
            self.slopes_per_step[name] = [fit_slope(self.widths, arr[:, t]) for t in range(arr.shape[1])]
            with np.errstate(divide="ignore", invalid="ignore"):
                self.slopes[name] = fit_slope(self.widths, np.exp(np.log(arr).mean(1)))

    def alignment(self, l: int, kind: str = "omega", step: int | None = None) -> float:
        """Alignment exponent of layer l (Everett et al. 2024): how a product scales beyond the
        entry sizes of its factors, e.g. omega_l = slope(Wdh_l) - slope(W_l) - slope(dh_{l-1}):
        1 when the factors are aligned (a sum of M correlated terms, BP), 1/2 when they are
        independent (CLT, TP). ``kind``: "alpha" (Delta W_l h_{l-1}), "omega" (W_l Delta h_{l-1}),
        "u" (Delta W_l Delta h_{l-1}). ``step``: a step index, or None for the step-averaged slopes."""
        sl = self.slopes if step is None else {k: v[step] for k, v in self.slopes_per_step.items()}
        if kind == "alpha":
            h_prev = sl[f"h_{l - 1}"] if l >= 2 else 0.0  # the input is fixed-size data
            return sl[f"dWh_{l}"] - sl[f"dW_{l}"] - h_prev
        if kind == "omega":
            return sl[f"Wdh_{l}"] - sl[f"W_{l}"] - sl[f"dh_{l - 1}"]
        if kind == "u":
            return sl[f"dWdh_{l}"] - sl[f"dW_{l}"] - sl[f"dh_{l - 1}"]
        raise ConfigError(f"unknown alignment kind '{kind}'; choose alpha, omega or u")

    @property
    def max_abs_slope(self) -> float:
        vals = [abs(self.slopes[n]) for n in self.counted if n in self.slopes]
        return float("inf") if any(math.isnan(v) for v in vals) else max(vals, default=0.0)

    def to_dict(self) -> dict:
        def clean(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x
        return {"axis": self.axis, ("widths" if self.axis == "width" else "depths"): self.widths, "steps": self.steps,
                "slopes": {k: clean(v) for k, v in self.slopes.items()},
                "slopes_per_step": {k: [clean(x) for x in v] for k, v in self.slopes_per_step.items()},
                "counted": self.counted, "max_abs_slope": clean(self.max_abs_slope),
                "rms": self.rms}

    def table(self) -> str:
        head = f"{'quantity':<12}{'counted':>8}" + "".join(f"{w:>11}" for w in self.widths) + f"{'slope':>9}"
        lines = [f"coordinate check across {self.axis}: RMS at the last of {self.steps} steps, slope of the "
                 f"step-averaged log RMS per doubling of the {self.axis}",
                 head, "-" * len(head)]
        for name, table in self.rms.items():
            row = "".join(f"{table[i][-1]:>11.3g}" for i in range(len(self.widths)))
            lines.append(f"{name:<12}{('yes' if name in self.counted else 'no'):>8}{row}{self.slopes[name]:>9.3f}")
        lines.append(f"max |slope| over counted quantities: {self.max_abs_slope:.3f}")
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> str:
        from ..plots import plot_coord
        return plot_coord(self, path, title)


def own_update(layer, inp: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None) -> torch.Tensor:
    """(W(t) - W(0)) inp + b(t) - b(0): the layer's own update applied to ``inp``, as the layer applies it
    (its multipliers, a residual branch's included)."""
    return layer.forward(inp, layer.weight - w0, False if layer.bias is None else layer.bias - b0)


@torch.no_grad()
def _measure(net: Net, w0, b0, acts0, f0, probe_x) -> dict[str, torch.Tensor]:
    us, acts = net.forward(probe_x)
    out = {}
    L = net.depth
    for l in range(1, L):
        out[f"h_{l}"] = rms(acts[l])
        out[f"dh_{l}"] = rms(acts[l] - acts0[l])
    for l in range(1, L + 1):
        layer = net.layers[l - 1]
        out[f"dWh_{l}"] = rms(own_update(layer, acts[l - 1], w0[l - 1], b0[l - 1]))
        dw = layer.weight - w0[l - 1]
        if l >= 2:
            da = acts[l - 1] - acts0[l - 1]
            out[f"Wdh_{l}"] = rms(layer.forward(da, w0[l - 1], False))
            out[f"dWdh_{l}"] = rms(layer.forward(da, dw, False))
        out[f"W_{l}"] = rms(w0[l - 1]) * layer.mult
        out[f"dW_{l}"] = rms(dw) * layer.mult
    out["df"] = rms(us[-1] - f0)
    out["f"] = rms(us[-1])
    return out


# shown but not counted across depth: f (as across width), and a single block's own update (~ 1/(H - 2) by design)
NOT_COUNTED_DEPTH = ("f", "dWh_first", "dWh_mid", "dWh_last")


def positions(depth: int) -> dict[str, int]:
    """The layers a depth check reads: the input layer, the first, middle and last residual block."""
    return {"in": 1, "first": 2, "mid": max(2, depth // 2), "last": depth - 1}


@torch.no_grad()
def _measure_depth(net: Net, w0, b0, acts0, f0, probe_x, us0) -> dict[str, torch.Tensor]:
    us, acts = net.forward(probe_x)
    own = {l: own_update(net.layers[l - 1], acts[l - 1], w0[l - 1], b0[l - 1]) for l in range(1, net.depth)}
    out = {}
    for name, l in positions(net.depth).items():
        out[f"h_{name}"] = rms(us[l])
        out[f"dh_{name}"] = rms(us[l] - us0[l])
        out[f"dWh_{name}"] = rms(own[l])
    out["dWh_blocks"] = rms(sum(own[l] for l in range(2, net.depth)))
    out["df"] = rms(us[-1] - f0)
    out["f"] = rms(us[-1])
    return out


def coord_check(make_net: Callable[[int], Net], algo, widths: Sequence[int], batches: Sequence[tuple],
                probe: torch.Tensor, lr: float, optimizer: str = "sgd", momentum: float = 0.0,
                axis: str = "width") -> CoordResult:
    """Run the coordinate check.

    ``make_net(width)`` builds a net (its K replicas are averaged over); ``batches`` is the list
    of (x, y) training batches, one per step, the same at every width; ``probe`` the fixed input
    batch measured after each step. ``axis="depth"``: ``widths`` are depths H, ``make_net(H)`` builds a
    residual net of depth H, and the quantities are read at the positions of :func:`positions`.
    """
    if axis not in ("width", "depth"):
        raise ConfigError(f"unknown coordinate-check axis '{axis}'; choose width or depth")
    widths = sorted(int(w) for w in widths)
    if len(widths) < 2:
        raise ConfigError(f"a coordinate check needs at least two {axis}s")
    if axis == "depth" and widths[0] < 4:
        raise ConfigError(f"a depth check needs depths >= 4 (a first and a last block), got {widths[0]}")
    if not batches:
        raise ConfigError("a coordinate check needs at least one step")
    rec: dict[str, list[list[float]]] = {}
    counted: list[str] = []
    for w in widths:
        net = make_net(w)
        if axis == "depth" and not net.residual_net:
            raise ConfigError(f"a depth check needs a residual net (--arch resmlp or rescnn), got a {net.kind}")
        opt = LayerwiseOptimizer.for_net(net, lr, optimizer, momentum=momentum)
        w0 = [layer.weight.clone() for layer in net.layers]
        b0 = [None if layer.bias is None else layer.bias.clone() for layer in net.layers]
        us0, acts0 = net.forward(probe)
        per_step: dict[str, list[float]] = {}
        for x, y in batches:
            grads, _ = algo.step(net, x, y, opt=opt)
            opt.step(grads)
            meas = (_measure(net, w0, b0, acts0, us0[-1], probe) if axis == "width"
                    else _measure_depth(net, w0, b0, acts0, us0[-1], probe, us0))
            if hasattr(algo, "coord_observables") and axis == "width":  # per-layer names: not comparable in depth
                meas.update(algo.coord_observables(net, x, y))
            for name, v in meas.items():
                per_step.setdefault(name, []).append(float(v.mean()))
        for name, v in per_step.items():
            rec.setdefault(name, []).append(v)
        if not counted and axis == "depth":
            counted = [n for n in per_step if n not in NOT_COUNTED_DEPTH]
        elif not counted:
            L = net.depth
            counted = ([f"h_{l}" for l in range(1, L)] + [f"dh_{l}" for l in range(1, L)]
                       + [f"dWh_{l}" for l in range(1, L + 1)] + [f"Wdh_{l}" for l in range(2, L + 1)] + ["df"]
                       + sorted(getattr(algo, "coord_counted", ())))
    return CoordResult(widths, len(batches), rec, counted, axis=axis)


def coord_batches(data, steps: int, batch_size: int = 64, probe_size: int = 256, seed: int = 0):
    """``steps`` training batches and a disjoint probe batch drawn (seeded) from a dataset."""
    if steps < 1 or batch_size < 1:
        raise ConfigError("steps and batch size must be positive")
    n = len(data.x_train)
    if n < steps * batch_size + probe_size:
        raise ConfigError(f"dataset has {n} training samples, the check needs {steps * batch_size + probe_size}")
    idx = torch.randperm(n, generator=generator("subset", seed))
    batches = [(data.x_train[idx[i * batch_size:(i + 1) * batch_size]],
                data.y_train[idx[i * batch_size:(i + 1) * batch_size]]) for i in range(steps)]
    return batches, data.x_train[idx[-probe_size:]]
