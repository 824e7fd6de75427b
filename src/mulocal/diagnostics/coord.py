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

Random-matrix control (``diagnostics.excess``): ``Wdh_l`` mixes an aligned part with the random-matrix part any
weight of its entry rms gives (M^-1/2 at the readout under muP); the check stores each cell's signed excess and
fits the aligned part's width exponent from all cells; the verdict reads that exponent where it is resolved and
leads (:meth:`CoordResult._read_excess`; ``CoordResult.excess`` records each choice and why, and
``max_abs_slope_raw`` the verdict with every raw term).

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
from .excess import S_GRID, Z_LEAD, Z_RESOLVE, cell_stats, fit_aligned, rms
from .measure import NOT_COUNTED_DEPTH, _block, _measure, _measure_depth, _part
from .slopes import fit_slope, jackknife_slope_se

FLAT = 0.15  # the |slope| per doubling below which the docs call a term flat (the issues' floor; plots' band)


@dataclass
class CoordResult:
    widths: list[int]  # the values of the axis: widths, or depths with axis="depth"
    steps: int
    rms: dict[str, list[list[float]]]  # name -> [width][step]
    counted: list[str]
    slopes: dict[str, float] = field(default_factory=dict)
    slopes_per_step: dict[str, list[float]] = field(default_factory=dict)
    axis: str = "width"
    # counted term with a random-matrix part -> {"read": the name the verdict reads, "why", "resolved": the fit's
    # amplitude is significant, "slope" / "se" / "z" / "z_crit" (and per step) of the aligned part's fit, the cells'
    # "D" / "sd" / "sd0" and the replicas' "d", "cells_resolved": the share of cells with D > Z_RESOLVE sd0}:
    # see :meth:`_read_excess`
    excess: dict[str, dict] = field(default_factory=dict)
    # term -> {"d": [width][step][replica] raw_k^2 - ctrl_k^2, "var0": [width][step][replica] its null variance}
    cells: dict[str, dict[str, list]] = field(default_factory=dict)
    replicas: dict[str, list] = field(default_factory=dict)  # name -> [width][step][replica] RMS (rms: their mean)
    # name -> the slope's standard error over the replicas (``slopes.jackknife_slope_se``; an excess: its fit's se)
    slope_se: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name, table in self.rms.items():
            arr = np.asarray(table, dtype=float)  # (widths, steps)
            self.slopes_per_step[name] = [fit_slope(self.widths, arr[:, t]) for t in range(arr.shape[1])]
            with np.errstate(divide="ignore", invalid="ignore"):
                self.slopes[name] = fit_slope(self.widths, np.exp(np.log(arr).mean(1)))
        for name, reps in self.replicas.items():
            self.slope_se[name] = jackknife_slope_se(self.widths, reps)
        self.counted = [self._read_excess(n) for n in self.counted]

    def _cells(self, name: str):
        """Per (width, step) cell of the term ``name``: D, its null sd sigma_0 and the sd the fit uses, and the same
        for the step-averaged D (the pooled fit). From ``cells`` (the replicas' values); a result without them (a
        table written by hand) takes D = xs^2 and sigma_0 = floor^2 / Z_RESOLVE from its rows, as one replica."""
        if name in self.cells:
            d = np.asarray(self.cells[name]["d"], float)  # (widths, steps, K)
            var0 = np.asarray(self.cells[name]["var0"], float)
        else:
            d = np.asarray(self.rms[_part(name, "xs")], float)[..., None] ** 2
            var0 = (np.asarray(self.rms[_part(name, "floor")], float)[..., None] ** 2 / Z_RESOLVE) ** 2
        return cell_stats(d, var0)

    def _read_excess(self, name: str) -> str:
        """The name the verdict reads for the counted term ``name``: its aligned excess ``<name>_xs`` (whose slope is
        the fitted exponent of the aligned part) where that part is resolved and leads, else the raw term.

        A term Q with a random-matrix part (``Wdh_l`` = W_l(0) Delta a_{l-1}, and ``df`` = dWh_L + Wdh_L) is a
        sum of two power laws, Q^2 ~ A^2 + ctrl^2 (the aligned part and the random-matrix control); their sum is
        not a power law at widths where both count (BP's readout under muP: A ~ M^0, ctrl ~ M^-1/2, equal at
        ~32), so the raw slope mixes them, and the large-width exponent of Q is max(s, slope(ctrl)). Per cell,
        D = mean_k (raw_k^2 - ctrl_k^2) estimates A^2 with sd max(sigma_0, the replicas' spread / sqrt(K))
        (:meth:`_cells`). :func:`fit_aligned` fits D = c_t M^(2 s) across the widths, per step t (the slopes per
        step of ``<name>_xs``) and on the step-averaged D (its slope; the shared exponent, c = mean_t c_t: a
        model with one exponent for all steps, fitted on the average because the steps' noise is correlated).
        The verdict reads

        * ``<name>_xs`` (slope s-hat) when the pooled fit is resolved (its amplitude's significance z clears
          z_crit, the level a term with no aligned part reaches with probability <= Phi-bar(Z_RESOLVE) =
          0.00135, the search over s included) and s-hat + Z_LEAD se >= slope(ctrl): the aligned part is
          measured and it leads at large width;
        * the raw term otherwise: "random-matrix dominated" where the aligned part is not resolved (e.g. TP's
          readout, whose W_L(0) is independent of Delta a_{L-1} by design, so the random-matrix part *is* the
          contribution, Theta(1) with b_L = 1/2), or its exponent is not determined (the fit's maximum at the
          edge of ``S_GRID``); "random-matrix led" where the control grows faster (the raw term tends to the
          control's exponent).
        """
        xs, floor, ctrl = (_part(name, p) for p in ("xs", "floor", "ctrl"))
        if ctrl not in self.rms or (name not in self.cells and (xs not in self.rms or floor not in self.rms)):
            return name
        D, sd0, sd, D_bar, sd_bar = self._cells(name)
        if not (np.all(np.isfinite(D)) and np.all(np.isfinite(sd)) and np.all(sd > 0)):
            self.slopes[xs], self.slopes_per_step[xs] = float("nan"), [float("nan")] * D.shape[1]
            self.excess[name] = {"read": name, "why": "not measured (a non-finite or zero-noise cell: diverged?)",
                                 "resolved": False, "slope": float("nan"), "se": float("nan"), "z": float("nan"),
                                 "z_crit": float("nan"), "slope_per_step": self.slopes_per_step[xs],
                                 "se_per_step": [float("nan")] * D.shape[1], "z_per_step": [float("nan")] * D.shape[1],
                                 "cells_resolved": 0.0, "D": D.tolist(), "sd": sd.tolist(), "sd0": sd0.tolist()}
            return name
        per = fit_aligned(self.widths, D.T, sd.T)  # one fit per step
        fit = {k: v.item() for k, v in fit_aligned(self.widths, D_bar, sd_bar).items()}
        self.slopes[xs], self.slope_se[xs] = fit["s"], fit["se"]
        self.slopes_per_step[xs] = [float(v) for v in per["s"]]
        c_slope = self.slopes[ctrl]
        if not fit["resolved"]:
            read, why = name, ("random-matrix dominated (" + (
                f"aligned part not resolved: z = {fit['z']:.1f} < {fit['z_crit']:.1f})" if fit["z"] < fit["z_crit"]
                else f"the aligned exponent is not determined within +-{S_GRID[-1]:g})"))
        elif fit["s"] + Z_LEAD * fit["se"] >= c_slope:
            read, why = xs, (f"aligned part resolved (z = {fit['z']:.1f} >= {fit['z_crit']:.1f}) and leading "
                             f"(the control's slope {c_slope:+.3f})")
        else:
            read, why = name, (f"random-matrix led (the control's slope {c_slope:+.3f} exceeds the aligned exponent "
                               f"by more than {Z_LEAD:g} se)")
        self.excess[name] = {
            "read": read, "why": why, "resolved": bool(fit["resolved"]),
            "slope": fit["s"], "se": fit["se"], "z": fit["z"], "z_crit": fit["z_crit"],
            "slope_per_step": per["s"].tolist(), "se_per_step": per["se"].tolist(), "z_per_step": per["z"].tolist(),
            "cells_resolved": float((D > Z_RESOLVE * sd0).mean()),
            "D": D.tolist(), "sd": sd.tolist(), "sd0": sd0.tolist(),
            **({"d": self.cells[name]["d"]} if name in self.cells else {})}
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
    def leading(self) -> str | None:
        """The counted quantity whose |slope| is the verdict (None without counted quantities)."""
        named = [n for n in self.counted if n in self.slopes]
        return max(named, key=lambda n: abs(self.slopes[n]) if math.isfinite(self.slopes[n]) else math.inf,
                   default=None)

    @property
    def max_abs_slope_se(self) -> float:
        """The standard error of the verdict's term (nan where not measured, e.g. one replica): the verdict is the
        largest of some twenty noisy slopes, so a value within ~2 se of a floor does not decide it."""
        return self.slope_se.get(self.leading, float("nan")) if self.leading else float("nan")

    @property
    def max_abs_slope_raw(self) -> float:
        """The same with every raw term in place of its excess (the check before the random-matrix control)."""
        raw = {e["read"]: name for name, e in self.excess.items()}
        return self._max_abs([raw.get(n, n) for n in self.counted])

    def to_dict(self) -> dict:
        def clean(x):
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return None if isinstance(x, float) and not math.isfinite(x) else x
        return {"axis": self.axis, ("widths" if self.axis == "width" else "depths"): self.widths, "steps": self.steps,
                "slopes": {k: clean(v) for k, v in self.slopes.items()},
                "slopes_per_step": {k: [clean(x) for x in v] for k, v in self.slopes_per_step.items()},
                "counted": self.counted, "max_abs_slope": clean(self.max_abs_slope),
                "leading": self.leading, "max_abs_slope_se": clean(self.max_abs_slope_se),
                "slope_se": clean(self.slope_se), "rms": self.rms,
                **({"replicas": self.replicas} if self.replicas else {}),
                **({"excess": clean(self.excess), "max_abs_slope_raw": clean(self.max_abs_slope_raw)} if self.excess else {})}

    def table(self) -> str:
        head = f"{'quantity':<12}{'counted':>8}" + "".join(f"{w:>11}" for w in self.widths) + f"{'slope':>9}"
        lines = [f"coordinate check across {self.axis}: RMS at the last of {self.steps} steps, slope of the "
                 f"step-averaged log RMS per doubling of the {self.axis}",
                 head, "-" * len(head)]
        for name, table in self.rms.items():
            row = "".join(f"{table[i][-1]:>11.3g}" for i in range(len(self.widths)))
            lines.append(f"{name:<12}{('yes' if name in self.counted else 'no'):>8}{row}{self.slopes[name]:>9.3f}")
        for name, e in self.excess.items():
            lines.append(f"{name}: the verdict reads {e['read']} ({e['why']}; aligned exponent {e['slope']:+.3f} +- "
                         f"{e['se']:.3f}, per step " + ", ".join(f"{v:+.2f}" for v in e["slope_per_step"])
                         + f"; D above {Z_RESOLVE:g} sd in {e['cells_resolved']:.0%} of the width x step cells)")
        verdict, se = f"max |slope| over counted quantities: {self.max_abs_slope:.3f}", self.max_abs_slope_se
        if self.leading:
            pooled = {e["read"] for e in self.excess.values()}  # an aligned excess: one value per cell, its fit's se
            K = max((len(r[0][0]) for r in self.replicas.values()), default=0)
            how = " (the aligned part's fit)" if self.leading in pooled else (
                f" by a jackknife over {K} replicas" if K > 1 else "")
            verdict += f" ({self.leading}" + (f", +- {se:.3f}{how}" if math.isfinite(se) else "") + ")"
        if self.excess:
            verdict += f"; raw terms in place of their excess: {self.max_abs_slope_raw:.3f}"
        lines.append(verdict)
        if math.isfinite(se) and abs(self.max_abs_slope - FLAT) < 2 * se:
            lines.append(f"within 2 se of {FLAT:g}: the replicas' noise decides this verdict; the se falls as "
                         f"1 / sqrt(replicas) (--replicas)")
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> str:
        from ..plots import plot_coord
        return plot_coord(self, path, title)


def join(parts: Sequence[CoordResult]) -> CoordResult:
    """One check from checks of the same nets, batches and probe over disjoint sets of replicas (seeds), e.g. run a
    few replicas at a time to fit in memory: every per-replica value and cell kept, the tables their means, each
    aligned excess and its floor per cell recomputed from the joined cells (``excess.aligned_excess``'s formulas);
    the same result as one check of all the replicas (tests/test_coord_seeds.py)."""
    first = parts[0]
    if any(p.widths != first.widths or p.steps != first.steps or p.axis != first.axis or set(p.replicas)
           != set(first.replicas) for p in parts):
        raise ConfigError("joined coordinate checks must share their widths, steps, axis and quantities")
    reps = {n: np.concatenate([np.asarray(p.replicas[n], float) for p in parts], -1) for n in first.replicas}
    cells = {n: {k: np.concatenate([np.asarray(p.cells[n][k], float) for p in parts], -1).tolist()
                 for k in first.cells[n]} for n in first.cells}
    rms_ = {n: v.mean(-1).tolist() for n, v in reps.items()}
    for name, c in cells.items():
        D, sd0 = cell_stats(np.asarray(c["d"]), np.asarray(c["var0"]))[:2]
        rms_[_part(name, "xs")] = np.sqrt(np.maximum(D, 0.0)).tolist()
        rms_[_part(name, "floor")] = np.sqrt(Z_RESOLVE * sd0).tolist()
    raw = {e["read"]: name for name, e in first.excess.items()}
    return CoordResult(first.widths, first.steps, rms_, [raw.get(n, n) for n in first.counted], axis=first.axis,
                       cells=cells, replicas={n: v.tolist() for n, v in reps.items()})


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
    reps: dict[str, list] = {}
    cells: dict[str, dict[str, list]] = {}
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
        per_rep: dict[str, list[list[float]]] = {}
        per_cell: dict[str, dict[str, list]] = {}
        for x, y in batches:
            grads, _ = algo.step(net, x, y, opt=opt)
            opt.step(grads)
            meas, cell = (_measure(net, w0, b0, acts0, us0[-1], probe) if axis == "width"
                          else (_measure_depth(net, w0, b0, acts0, us0[-1], probe, us0), {}))
            for term, parts in cell.items():
                for part, v in parts.items():
                    per_cell.setdefault(term, {}).setdefault(part, []).append(v.tolist())
            if hasattr(algo, "coord_observables") and axis == "width":  # per-layer names: not comparable in depth
                meas.update(algo.coord_observables(net, x, y))
            for name, v in meas.items():
                per_step.setdefault(name, []).append(float(v.mean()))
                if v.numel() == net.K:  # per replica (an aligned excess is one pooled value per cell)
                    per_rep.setdefault(name, []).append(v.double().reshape(-1).tolist())
        for name, v in per_step.items():
            rec.setdefault(name, []).append(v)
            if name in per_rep:
                reps.setdefault(name, []).append(per_rep[name])
        for term, parts in per_cell.items():
            for part, v in parts.items():
                cells.setdefault(term, {}).setdefault(part, []).append(v)
        if not counted and axis == "depth":
            counted = [n for n in per_step if n not in NOT_COUNTED_DEPTH]
        elif not counted:
            L = net.depth
            counted = ([f"h_{l}" for l in range(1, L)] + [f"dh_{l}" for l in range(1, L)]
                       + [f"dWh_{l}" for l in range(1, L + 1)] + [f"Wdh_{l}" for l in range(2, L + 1)] + ["df"]
                       + sorted(getattr(algo, "coord_counted", ())))
    return CoordResult(widths, len(batches), rec, counted, axis=axis, cells=cells, replicas=reps)


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
