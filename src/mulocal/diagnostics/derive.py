"""Exponent fitter: measure how each contribution scales with width and solve for the maximal update.

Starting from a trial parameterization (b, c), each round runs a coordinate check and reads the
log-log slopes of the *first* update, which depends only on the initial state and on each
layer's own learning rate:

    Delta W_l h_{l-1} ~ M^{s_l}   with lr_l ~ M^{-c_l}      =>   c_l <- c_l + s_l
    W_L Delta h_{L-1} ~ M^{w}     with W_L ~ M^{-b_L}       =>   b_L <- b_L + w - slope(Delta h_{L-1})

(the second rule divides out Delta h_{L-1}'s own scaling, which vanishes at the fixed point). Both
rules are exact for one SGD/Adam step of a layer whose other factors do not depend on c_l or b_L,
and the rounds (usually 2-3) absorb the coupling between layers (b_L sets the size of the
backward signal that the hidden learning rates see). The fit stops when every exponent moves by
less than ``tol``. The verdict compares the fitted table with a reference preset.

Networks without biases are used (a bias has its own exponent and would mix into Delta W h).

The final check also reads the learning rule's inference perturbation of the values (PC's ``pert_l``,
the RMS of v_l minus its feed-forward value; PC scales it like M^{-1-gbar_L} for v_{L-1}). No
exponent of (b, c) can fix it: a ``pert_l`` whose width slope exceeds ``tolerance`` (or whose RMS is
not finite) grows with width and is listed in ``DeriveResult.unstable`` (gbar_L < -1: the
parameterization is unstable whatever the fitted table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..param import Parameterization
from .coord import CoordResult, coord_check, rms
from .slopes import fit_slope


PERTURBATION = "pert_"  # prefix of the inference-perturbation observables (PC's coord_observables)


@dataclass(kw_only=True)
class _Fit:
    """What every fit result shares: where it started, its rounds and final check, convergence, and agreement
    with a reference within ``tolerance`` (a subclass lists its exponents' deviations in ``_deviations``)."""

    start: Parameterization
    rounds: list[dict] = field(default_factory=list)
    final: CoordResult | None = None
    reference: Parameterization | None = None
    tolerance: float = 0.15

    def _deviations(self) -> list[float]:
        raise NotImplementedError

    @property
    def max_deviation(self) -> float:
        """The largest |fitted - reference| exponent (nan without a reference)."""
        return float("nan") if self.reference is None else max(self._deviations())

    @property
    def converged(self) -> bool:
        return bool(self.rounds) and self.rounds[-1]["max_change"] < 0.05

    @property
    def agrees(self) -> bool | None:
        """Whether the fitted exponents match the reference within ``tolerance`` (None without a reference)."""
        if self.reference is None:
            return None
        return self.max_deviation <= self.tolerance

    def _fit_dict(self) -> dict:
        return {"rounds": self.rounds, "converged": self.converged,
                "fit_quality": {"max_abs_slope": self.final.max_abs_slope if self.final else None,
                                "slopes": self.final.slopes if self.final else None}}

    def _verdict_line(self) -> str:
        return (f"vs {self.reference.name}: max deviation {self.max_deviation:.3f} -> "
                + ("agrees" if self.agrees else f"DISAGREES (tolerance {self.tolerance})"))


@dataclass
class DeriveResult(_Fit):
    b: list[float]
    c: list[float]

    def _deviations(self) -> list[float]:
        return [abs(x - y) for x, y in zip(self.b, self.reference.b)] + \
               [abs(x - y) for x, y in zip(self.c, self.reference.c)]

    @property
    def perturbation_slopes(self) -> dict[str, float]:
        """Width slope of each inference perturbation (``pert_l``) in the final check ({} without one)."""
        if self.final is None:
            return {}
        return {k: v for k, v in self.final.slopes.items() if k.startswith(PERTURBATION)}

    @property
    def unstable(self) -> list[str]:
        """The inference perturbations of the final check that grow with width: slope > ``tolerance``,
        or a non-finite RMS (diverged). Empty for a stable setting."""
        out = []
        for name, slope in self.perturbation_slopes.items():
            finite = all(math.isfinite(v) for row in self.final.rms[name] for v in row)
            if not finite or slope > self.tolerance:
                out.append(name)
        return out

    @property
    def unstable_note(self) -> str | None:
        """One line explaining :attr:`unstable`, or None."""
        if not self.unstable:
            return None
        sl = self.perturbation_slopes
        parts = ", ".join(f"{n} ~ M^{sl[n]:.2f}" if math.isfinite(sl[n]) else f"{n} diverged" for n in self.unstable)
        return (f"UNSTABLE: the inference perturbation grows with width ({parts}; slope > {self.tolerance:g}): "
                f"PC's v_(L-1) moves like M^(-1 - gbar_L), stable only for gbar_L >= -1")

    def to_dict(self) -> dict:
        out = {"b": [round(v, 4) for v in self.b], "c": [round(v, 4) for v in self.c],
               "start": {"name": self.start.name, "b": list(self.start.b), "c": list(self.start.c)},
               **self._fit_dict(),
               "perturbation_slopes": self.perturbation_slopes, "unstable": self.unstable,
               "unstable_note": self.unstable_note}
        if self.reference is not None:
            out["reference"] = {"name": self.reference.name, "b": list(self.reference.b), "c": list(self.reference.c)}
            out["max_deviation"] = self.max_deviation
            out["agrees"] = self.agrees
        return out

    def table(self) -> str:
        roles = ("input", "hidden", "output")
        lines = [f"{'':<8}{'fitted b':>10}{'fitted c':>10}" + (f"{'preset b':>10}{'preset c':>10}"
                                                                 if self.reference else "")]
        for i, role in enumerate(roles):
            row = f"{role:<8}{self.b[i]:>10.3f}{self.c[i]:>10.3f}"
            if self.reference:
                row += f"{self.reference.b[i]:>10.3g}{self.reference.c[i]:>10.3g}"
            lines.append(row)
        q = self.final.max_abs_slope if self.final else float("nan")
        lines.append(f"rounds: {len(self.rounds)}, converged: {self.converged}, "
                     f"max |slope| with the fitted table: {q:.3f}")
        if self.reference is not None:
            lines.append(self._verdict_line())
        if self.perturbation_slopes:
            lines.append("inference perturbation slopes: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in self.perturbation_slopes.items()))
        if self.unstable_note:
            lines.append(self.unstable_note)
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> str:
        from ..plots import plot_derive
        return plot_derive(self, path, title)


def derive(make_net: Callable[[Parameterization, int], object], algo, start: Parameterization,
           widths: Sequence[int], batches, probe, lr: float, optimizer: str = "sgd", *, fit_b: bool = True,
           rounds: int = 5, tol: float = 0.02, reference: Parameterization | None = None,
           tolerance: float = 0.15) -> DeriveResult:
    """Fit the learning-rate exponents c (and the output init exponent b_L) of ``algo``.

    ``make_net(param, width)`` builds a network (K replicas averaged over); ``batches`` and
    ``probe`` are as for :func:`coord_check` (at least one step).
    """
    if rounds < 1:
        raise ConfigError("the fitter needs at least one round")
    b, c = list(start.b), list(start.c)
    res = DeriveResult(b, c, start=start, reference=reference, tolerance=tolerance)
    for _ in range(rounds):
        param = start.with_(b=tuple(b), c=tuple(c))
        coord = coord_check(lambda w: make_net(param, w), algo, widths, batches, probe, lr, optimizer)
        first = {k: v[0] for k, v in coord.slopes_per_step.items()}
        L = sum(1 for k in first if k.startswith("dWh_"))
        roles = ["input"] + ["hidden"] * (L - 2) + ["output"]
        by_role: dict[str, list[float]] = {}
        for l in range(1, L + 1):
            by_role.setdefault(roles[l - 1], []).append(first[f"dWh_{l}"])
        new_c = [c[i] + sum(v) / len(v) for i, v in enumerate(by_role[r] for r in ("input", "hidden", "output"))]
        new_b = list(b)
        if fit_b and L >= 2:
            w = first[f"Wdh_{L}"] - first[f"dh_{L - 1}"]
            if math.isfinite(w):
                new_b[2] = b[2] + w
        if not all(math.isfinite(v) for v in new_c + new_b):
            raise ConfigError("the fitter met a non-finite slope (a diverged or zero update); "
                              "try a smaller learning rate")
        change = max(abs(x - y) for x, y in zip(new_c + new_b, c + b))
        res.rounds.append({"b": list(b), "c": list(c), "first_step_slopes": first, "max_change": change})
        b, c = new_b, new_c
        res.b, res.c = b, c
        if change < tol:
            break
    param = start.with_(b=tuple(b), c=tuple(c))
    res.final = coord_check(lambda w: make_net(param, w), algo, widths, batches, probe, lr, optimizer)
    return res


# ---------------------------------------------------------------------------------------------- depth
@dataclass
class DepthDeriveResult(_Fit):
    """The fitted depth exponents: the branch multiplier's alpha (a = d^-alpha) and the branch LR's c_H."""

    alpha: float
    c_H: float

    def _deviations(self) -> list[float]:
        return [abs(self.alpha - self.reference.depth_alpha), abs(self.c_H - self.reference.depth_lr_exponent())]

    def to_dict(self) -> dict:
        out = {"alpha": round(self.alpha, 4), "c_H": round(self.c_H, 4),
               "start": {"name": self.start.name, "alpha": self.start.depth_alpha,
                         "c_H": self.start.depth_lr_exponent()},
               **self._fit_dict()}
        if self.reference is not None:
            out["reference"] = {"name": self.reference.name, "alpha": self.reference.depth_alpha,
                                "c_H": self.reference.depth_lr_exponent()}
            out["max_deviation"], out["agrees"] = self.max_deviation, self.agrees
        return out

    def table(self) -> str:
        ref = self.reference
        lines = [f"{'':<22}{'fitted':>9}" + (f"{'preset':>9}" if ref else ""),
                 f"{'alpha (a = d^-alpha)':<22}{self.alpha:>9.3f}" + (f"{ref.depth_alpha:>9.3g}" if ref else ""),
                 f"{'c_H (LR * d^-c_H)':<22}{self.c_H:>9.3f}" + (f"{ref.depth_lr_exponent():>9.3g}" if ref else "")]
        q = self.final.max_abs_slope if self.final else float("nan")
        lines.append(f"rounds: {len(self.rounds)}, converged: {self.converged}, max |slope| per doubling of depth "
                     f"with the fitted exponents: {q:.3f}")
        if ref is not None:
            lines.append(self._verdict_line())
        return "\n".join(lines)


def derive_depth(make_net: Callable[[Parameterization, int], object], algo, start: Parameterization,
                 depths: Sequence[int], batches, probe, lr: float, optimizer: str = "sgd", *, rounds: int = 6,
                 tol: float = 0.02, reference: Parameterization | None = None,
                 tolerance: float = 0.15) -> DepthDeriveResult:
    """Fit the depth exponents (alpha, c_H) of a residual net from depth coordinate checks (``axis="depth"``).

    Each round reads the slopes against the number of blocks d ~ H - 2 (log-log) of the last block's stream at
    initialisation s_h = slope(h_last) and, after the first step, of the blocks' summed own update
    s_u = slope(dWh_blocks), and sets

        alpha <- alpha + s_h          c_H <- c_H + s_u

    Why: the stream's variance is ~ 1 + C d^(1 - 2 alpha) (d blocks, each adding a^2 = d^-2 alpha), so s_h > 0
    iff alpha < 1/2 and s_h = 0 exactly at alpha = 1/2 (for alpha > 1/2, s_h < 0 pulls it back): the smallest
    alpha with a depth-independent forward pass. The blocks' updates add up to ~ d a^2 eta_l (SGD; d a eta_l
    with Adam) with eta_l ~ d^-c_H, so c_H moves by the excess slope until the sum is flat: 1 - 2 alpha (SGD),
    1 - alpha (Adam). ``make_net(param, depth)`` builds a residual net.
    """
    if rounds < 1:
        raise ConfigError("the fitter needs at least one round")
    alpha, c_H = float(start.depth_alpha), float(start.depth_lr_exponent())
    res = DepthDeriveResult(alpha, c_H, start=start, reference=reference, tolerance=tolerance)

    blocks = [H - 2 for H in sorted(depths)]  # the laws are in d ~ H - 2 (exact at small depth, not H)

    def check(a, c):
        """The depth coordinate check at (alpha, c_H), and the slope of rms(h_{H-1}) at initialisation (the step's
        own growth left out), read from the nets the check builds (in order of depth) before they train."""
        param = start.with_(depth_alpha=a, depth_c=c)
        init = []

        def build(H):
            net = make_net(param, H)
            with torch.no_grad():
                init.append(float(rms(net.forward(probe)[0][H - 1]).mean()))
            return net
        coord = coord_check(build, algo, depths, batches, probe, lr, optimizer, axis="depth")
        return coord, fit_slope(blocks, init)
    for _ in range(rounds):
        coord, s_h = check(alpha, c_H)
        s_u = fit_slope(blocks, [row[0] for row in coord.rms["dWh_blocks"]])
        if not (math.isfinite(s_h) and math.isfinite(s_u)):
            raise ConfigError("the depth fitter met a non-finite slope (a diverged or zero update); "
                              "try a smaller learning rate")
        new_alpha, new_c = alpha + s_h, c_H + s_u
        change = max(abs(new_alpha - alpha), abs(new_c - c_H))
        res.rounds.append({"alpha": alpha, "c_H": c_H, "slope_h_last": s_h, "slope_dWh_blocks": s_u,
                           "max_change": change})
        alpha, c_H = new_alpha, new_c
        res.alpha, res.c_H = alpha, c_H
        if change < tol:
            break
    res.final = check(alpha, c_H)[0]
    return res
