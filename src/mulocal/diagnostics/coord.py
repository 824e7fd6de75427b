"""Coordinate check: how the size of each contribution to a training step scales with width.

For every width, K replicas (seeds) take ``steps`` updates on the same batches; after each
update t we measure on a fixed probe batch, per layer l (RMS over coordinates, averaged over
replicas):

===============  ============================================  ===========================
name             quantity                                      muP keeps it Theta(1)
===============  ============================================  ===========================
``h_l``          activity a_l = post(u_l), hidden layers       yes
``dh_l``         a_l(t) - a_l(0)                               yes
``dWh_l``        (W_l(t) - W_l(0)) a_{l-1}(t) (+ bias change)  yes
``Wdh_l``        W_l(0) (a_{l-1}(t) - a_{l-1}(0)), l >= 2      yes (read via ``Wdh_xs_l``)
``df``           f(t) - f(0)                                   yes (read via ``df_xs``)
``f``            f(t)                                          no (vanishes when b_L = 1)
``W_l``          RMS entry of W_l(0) (times its multiplier)    no (it is M^-b_l)
``dW_l``         RMS entry of W_l(t) - W_l(0)                  no
``dWdh_l``       (W_l(t) - W_l(0)) Delta a_{l-1}               no (second order)
``Wdh_ctrl_l``   random-matrix control of ``Wdh_l``            no (M^-1/2 at the readout)
``Wdh_xs_l``     aligned excess sqrt(max(Wdh^2 - ctrl^2, 0))   yes, where resolved
``Wdh_floor_l``  the excess a null term reaches (3 sd)         no
``df_ctrl``      ``Wdh_ctrl_L`` (df = dWh_L + Wdh_L)           no
``df_xs``        aligned excess of df                          yes, where resolved
``df_floor``     its floor                                     no
===============  ============================================  ===========================

Random-matrix control. W_l(0) Delta a_{l-1} is an aligned part (the part that muP keeps Theta(1): Delta a
correlated with W_l(0), e.g. through backprop's W_l^T) plus the random-matrix part that any weight of the
same entry rms s gives: a W drawn independently of Delta a gives rms^2 = ``Wdh_ctrl_l``^2 = mult^2 s^2
fan_in rms(Delta a)^2 in expectation (:func:`random_matrix_rms`; a conv's fan-in c_in k^2, less at the
zero-padded borders). Under muP it is Theta(1) in hidden layers but ~ M^-1/2 at the readout (b_L = 1),
so at small widths (e.g. from a base width of 32, or on a CNN whose readout fan-in is spatial size x
channels) the raw ``Wdh_L`` mixes a flat part and a falling one and its slope is no exponent. The aligned
excess ``Wdh_xs_l`` subtracts the control in squares (pooled over replicas, :func:`aligned_excess`); it is
*resolved* where it exceeds ``Wdh_floor_l``, the excess that a term with no aligned part reaches at Z_RESOLVE = 3
standard deviations of its exact (dense) or bounded (conv) spread over the probe (:func:`null_variance`).
The verdict reads ``Wdh_xs_l`` (and ``df_xs``) in place of the raw term where the excess is resolved at
every width and step and its slope is at least the control's (it leads at large width); elsewhere the raw
term (random-matrix dominated, e.g. TP's independent readout, whose random part *is* the Theta(1)
contribution): see :meth:`CoordResult._read_excess`; ``CoordResult.excess`` records each choice and
``max_abs_slope_raw`` the verdict with every raw term.

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
|slope| among the counted quantities (``counted``: with the aligned excesses that the verdict reads).
A learning rule can add observables by defining
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


def _part(name: str, part: str) -> str:
    """The name of a term's part: ``Wdh_3`` -> ``Wdh_xs_3``, ``df`` -> ``df_xs``."""
    head, _, tail = name.rpartition("_")
    return f"{head}_{part}_{tail}" if head and tail.isdigit() else f"{name}_{part}"


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
    # counted term with a random-matrix part -> {"read": the name the verdict reads, "resolved": the share of
    # (width, step) cells whose excess clears its floor, "why"}: see :meth:`_read_excess`
    excess: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        for name, table in self.rms.items():
            arr = np.asarray(table, dtype=float)  # (widths, steps)
            self.slopes_per_step[name] = [fit_slope(self.widths, arr[:, t]) for t in range(arr.shape[1])]
            with np.errstate(divide="ignore", invalid="ignore"):
                self.slopes[name] = fit_slope(self.widths, np.exp(np.log(arr).mean(1)))
        self.counted = [self._read_excess(n) for n in self.counted]

    def _read_excess(self, name: str) -> str:
        """The name the verdict reads for the counted term ``name``: its aligned excess ``<name>_xs`` where that
        is resolved and leads, else the raw term.

        A term Q with a random-matrix part (``Wdh_l`` = W_l(0) Delta a_{l-1}, and ``df`` = dWh_L + Wdh_L) is a
        sum of two power laws, Q^2 ~ xs^2 + ctrl^2 (the aligned excess and the random-matrix control, see
        :func:`aligned_excess`); their sum is not a power law at widths where both count (BP's readout under
        muP: xs ~ M^0, ctrl ~ M^-1/2 at fixed fan-in scaling, equal at 32), so the raw slope mixes them, and
        the large-width exponent of Q is max(slope(xs), slope(ctrl)). The verdict reads

        * ``<name>_xs`` when the excess clears its floor (excess > floor: more than Z_RESOLVE null standard
          deviations) at every width and step, and slope(xs) >= slope(ctrl): the aligned part is measured and
          it is the part that leads at large width;
        * the raw term otherwise: where the excess is unresolved everywhere ("random-matrix dominated", e.g.
          TP's readout, whose W_L(0) is independent of Delta a_{L-1} by design, so the random-matrix part *is*
          the contribution, Theta(1) with b_L = 1/2); where it is resolved only at some widths or steps
          ("partly resolved": no subtraction can be trusted everywhere); and where the control grows faster
          ("random-matrix led": the raw term tends to the control's exponent).
        """
        xs, floor, ctrl = (_part(name, p) for p in ("xs", "floor", "ctrl"))
        if xs not in self.rms or floor not in self.rms or ctrl not in self.rms:
            return name
        ok = np.asarray(self.rms[xs], float) > np.asarray(self.rms[floor], float)  # (widths, steps)
        share = float(ok.mean())
        if ok.all() and self.slopes[xs] >= self.slopes[ctrl]:
            read, why = xs, "aligned excess resolved at every width and step"
        elif ok.all():
            read, why = name, "random-matrix led (its control's slope is larger)"
        elif ok.any():
            read, why = name, "partly resolved"
        else:
            read, why = name, "random-matrix dominated"
        self.excess[name] = {"read": read, "resolved": share, "why": why}
        return read

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

    def _max_abs(self, names) -> float:
        vals = [abs(self.slopes[n]) for n in names if n in self.slopes]
        return float("inf") if any(math.isnan(v) for v in vals) else max(vals, default=0.0)

    @property
    def max_abs_slope(self) -> float:
        """The verdict: the largest |slope| among the counted quantities (aligned excesses where they are read)."""
        return self._max_abs(self.counted)

    @property
    def max_abs_slope_raw(self) -> float:
        """The same with every raw term in place of its excess (the check before the random-matrix control)."""
        raw = {e["read"]: name for name, e in self.excess.items()}
        return self._max_abs([raw.get(n, n) for n in self.counted])

    def to_dict(self) -> dict:
        def clean(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x
        return {"axis": self.axis, ("widths" if self.axis == "width" else "depths"): self.widths, "steps": self.steps,
                "slopes": {k: clean(v) for k, v in self.slopes.items()},
                "slopes_per_step": {k: [clean(x) for x in v] for k, v in self.slopes_per_step.items()},
                "counted": self.counted, "max_abs_slope": clean(self.max_abs_slope),
                "rms": self.rms,
                **({"excess": self.excess, "max_abs_slope_raw": clean(self.max_abs_slope_raw)} if self.excess else {})}

    def table(self) -> str:
        head = f"{'quantity':<12}{'counted':>8}" + "".join(f"{w:>11}" for w in self.widths) + f"{'slope':>9}"
        lines = [f"coordinate check across {self.axis}: RMS at the last of {self.steps} steps, slope of the "
                 f"step-averaged log RMS per doubling of the {self.axis}",
                 head, "-" * len(head)]
        for name, table in self.rms.items():
            row = "".join(f"{table[i][-1]:>11.3g}" for i in range(len(self.widths)))
            lines.append(f"{name:<12}{('yes' if name in self.counted else 'no'):>8}{row}{self.slopes[name]:>9.3f}")
        for name, e in self.excess.items():
            lines.append(f"{name}: the verdict reads {e['read']} ({e['why']}; excess above its floor in "
                         f"{e['resolved']:.0%} of the width x step cells)")
        lines.append(f"max |slope| over counted quantities: {self.max_abs_slope:.3f}"
                     + (f" (raw terms in place of their excess: {self.max_abs_slope_raw:.3f})" if self.excess else ""))
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> str:
        from ..plots import plot_coord
        return plot_coord(self, path, title)


def receptive_energy(layer, x: torch.Tensor) -> torch.Tensor:
    """E_l(x) = mean over output coordinates (batch, positions) of sum_{j in RF(o)} x_j^2, per replica: (K,).

    RF(o) is the set of input coordinates that output o reads: all ``fan_in`` of a dense layer's input, so
    E = fan_in * rms(x)^2; for a same-padded conv the c_in * k * k entries of the patch around o's position,
    fewer at the borders (zero padding), so E <= c_in k^2 rms(x)^2 with equality on the interior. Computed as
    the layer's own map with an all-ones filter of one output unit applied to x^2 (divided by its multiplier),
    so it pads exactly as the layer does."""
    x2 = x.detach().double().pow(2)
    ones = torch.ones(x.shape[0], 1, *layer.weight.shape[2:], dtype=torch.float64, device=x.device)
    return layer.forward(x2, ones, False).flatten(1).mean(1) / layer.mult


def random_matrix_rms(layer, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The random-matrix control of rms(mult W x): the rms that a weight W' with W's entry rms s = rms(W),
    drawn independently of x (zero mean, i.i.d. entries), gives in expectation, per replica (K,):

        control^2 = E_W' rms(mult W' x)^2 = mult^2 s^2 E_l(x)        (E_l: :func:`receptive_energy`)

    = (mult s sqrt(fan_in) rms(x))^2 for a dense layer (and a conv away from its borders). Exact for every x:
    each output is mult sum_{j in RF(o)} W'_oj x_j, whose square has mean mult^2 s^2 sum_{j in RF(o)} x_j^2.
    For Gaussian W' it holds given ||W'|| too (W' / ||W'|| is uniform on the sphere), so with s the drawn
    W's own rms, rms(mult W x)^2 - control^2 has mean 0 whenever W is independent of x."""
    return (rms(w) * abs(layer.mult)) * receptive_energy(layer, x).sqrt()


Z_RESOLVE = 3.0  # null standard deviations an aligned excess must clear to count as resolved (``aligned_excess``)


def null_variance(layer, x: torch.Tensor, ctrl: torch.Tensor) -> torch.Tensor:
    """Var(rms(mult W x)^2) for W drawn independently of x (Gaussian, entry rms s), per replica (K,): the
    spread of a random-matrix part around its control ``ctrl`` (:func:`random_matrix_rms`).

    Output unit o of the layer gives sum_r (w_o . z_r)^2 over the N rows r (samples, and positions of a
    conv) of the patch matrix Z (the unit's inputs, zero-padded), i.e. w_o^T G w_o with G = Z^T Z; the n_out
    units are independent and Var(w^T G w) = 2 s^4 tr(G^2), so with ctrl^2 = mult^2 s^2 tr(G) / N

        Var(rms^2) = 2 ctrl^4 tr(G^2) / (n_out tr(G)^2)                                       (<= 2 ctrl^4 / n_out)

    (given ||W||, with W / ||W|| uniform on the sphere of the d = n_out fan_in entries, the variance is
    2 s^4 (d / (d + 2)) (tr(A^2) - tr(A)^2 / d) <= 2 s^4 tr(A^2), A = I_{n_out} x G, so the formula bounds it with
    s = the drawn W's own rms, as ``ctrl`` uses). A dense layer's tr(G^2) =
    ||X X^T||_F^2 is computed exactly from the probe's N x N Gram matrix; a conv's would need its
    (c_in k^2)^2 patch Gram matrix (N = batch x positions rows), so it takes the bound tr(G^2) <= tr(G)^2
    (G >= 0; equality when x has rank one): conservative, it can only leave an excess unresolved."""
    from ..nets import Dense
    ctrl4 = ctrl.double().pow(4)
    if not isinstance(layer, Dense):
        return 2 * ctrl4 / layer.fan_out
    xd = x.detach().double()
    gram = torch.bmm(xd, xd.transpose(1, 2))  # (K, N, N)
    tr = gram.diagonal(dim1=1, dim2=2).sum(1)
    ratio = torch.where(tr > 0, gram.pow(2).sum((1, 2)) / tr.clamp_min(1e-300).pow(2), torch.zeros_like(tr))
    return 2 * ctrl4 * ratio / layer.fan_out


def aligned_excess(raw: torch.Tensor, ctrl: torch.Tensor, var0: torch.Tensor,
                   z: float = Z_RESOLVE) -> tuple[float, float]:
    """The aligned excess of a term over its random-matrix part, pooled over the K replicas, and its floor.

    ``raw``: rms(Q) per replica of a term Q = A + mult W(0) Delta a (A = 0 for ``Wdh_l``; dWh_L for ``df``),
    ``ctrl``: the control of its random-matrix part (:func:`random_matrix_rms`), ``var0``: that part's
    variance (:func:`null_variance`). With D = mean_k (raw_k^2 - ctrl_k^2),

        excess = sqrt(max(D, 0)),        floor = sqrt(z sigma_0),        sigma_0^2 = sum_k var0_k / K^2,

    the rms of Q without its random-matrix part (exact in expectation when that part is uncorrelated with the
    rest) and the excess that the null (A = 0 and W(0) independent of Delta a: D has mean 0, sd sigma_0)
    reaches at z standard deviations. The excess is *resolved* when excess > floor (D > z sigma_0); z = 3
    (``Z_RESOLVE``): a null term passes one (width, step) cell with probability <= 1 / (1 + z^2) = 0.1 whatever
    D's distribution (Cantelli), ~0.0013 for its near-Gaussian sum of n_out K quadratic forms, and it must pass
    every cell. Returns (excess, floor)."""
    K = raw.shape[0]
    d = float((raw.double().pow(2) - ctrl.double().pow(2)).mean())
    sigma0 = math.sqrt(float(var0.double().sum())) / K
    return math.sqrt(max(d, 0.0)), math.sqrt(z * sigma0)


def own_update(layer, inp: torch.Tensor, w0, b0: torch.Tensor | None) -> torch.Tensor:
    """(W(t) - W(0)) inp + b(t) - b(0): the layer's own update applied to ``inp``, as the layer applies it
    (its multipliers, a residual branch's included). A general block (a user's module, ``adapter.ModuleLayer``;
    ``w0`` its tensors at the start) is not linear in its weights: g(inp; theta(t)) - g(inp; theta(0))."""
    if _block(layer):
        return layer.own_change(inp, w0)
    return layer.forward(inp, layer.weight - w0, False if layer.bias is None else layer.bias - b0)


def _block(layer) -> bool:
    """A layer that is not linear in its input (a user's general module): W_l(0) Delta a is its change through the
    frozen block, g(a(t); theta(0)) - g(a(0); theta(0)), with no random-matrix control (it has no single W)."""
    return not getattr(layer, "linear_in_input", True)


@torch.no_grad()
def _measure(net: Net, w0, b0, acts0, f0, probe_x) -> dict[str, torch.Tensor]:
    us, acts = net.forward(probe_x)
    out, var0 = {}, {}
    L = net.depth
    for l in range(1, L):
        out[f"h_{l}"] = rms(acts[l])
        out[f"dh_{l}"] = rms(acts[l] - acts0[l])
    for l in range(1, L + 1):
        layer = net.layers[l - 1]
        out[f"dWh_{l}"] = rms(own_update(layer, acts[l - 1], w0[l - 1], b0[l - 1]))
        if _block(layer):  # the change through the frozen block; its first matrix for W_l and dW_l
            start = w0[l - 1][layer.matrix_index]
            if l >= 2:
                out[f"Wdh_{l}"] = rms(layer.input_change(acts[l - 1], acts0[l - 1], w0[l - 1]))
            out[f"W_{l}"] = rms(start) * layer.mults[layer.matrix_index]
            out[f"dW_{l}"] = rms(layer.weight - start) * layer.mults[layer.matrix_index]
            continue
        dw = layer.weight - w0[l - 1]
        if l >= 2:
            da = acts[l - 1] - acts0[l - 1]
            out[f"Wdh_{l}"] = rms(layer.forward(da, w0[l - 1], False))
            out[f"Wdh_ctrl_{l}"] = random_matrix_rms(layer, w0[l - 1], da)
            var0[l] = null_variance(layer, da, out[f"Wdh_ctrl_{l}"])
            out[f"dWdh_{l}"] = rms(layer.forward(da, dw, False))
        out[f"W_{l}"] = rms(w0[l - 1]) * layer.mult
        out[f"dW_{l}"] = rms(dw) * layer.mult
    out["df"] = rms(us[-1] - f0)
    out["f"] = rms(us[-1])
    # the aligned excess over the random-matrix part, and its floor; df = dWh_L + Wdh_L has Wdh_L's random part
    terms = [(f"Wdh_{l}", l) for l in range(2, L + 1) if l in var0] + ([("df", L)] if L in var0 else [])
    if L in var0:
        out["df_ctrl"] = out[f"Wdh_ctrl_{L}"]
    for name, l in terms:
        xs, floor = aligned_excess(out[name], out[_part(name, "ctrl")], var0[l])
        out[_part(name, "xs")], out[_part(name, "floor")] = torch.tensor(xs), torch.tensor(floor)
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
        w0 = [[t.clone() for t in layer.tensors()] if _block(layer) else layer.weight.clone() for layer in net.layers]
        b0 = [None if (_block(layer) or layer.bias is None) else layer.bias.clone() for layer in net.layers]
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
