"""The random-matrix part of a coordinate-check term W_l(0) Delta a_{l-1} and the aligned part's width exponent.

A term is an aligned part (what muP keeps Theta(1)) plus the random-matrix part that any weight of the same entry
rms gives: :func:`random_matrix_rms` is that part's exact expected size (the control), :func:`null_variance` its
spread, :func:`aligned_excess` the excess per cell, and :func:`fit_aligned` fits the aligned part's width exponent
from the signed excess of every cell.

W_l(0) Delta a_{l-1} is an aligned part (the part that muP keeps Theta(1): Delta a correlated with W_l(0), e.g.
through backprop's W_l^T) plus the random-matrix part that any weight of the same entry rms s gives: a W drawn
independently of Delta a gives rms^2 = ``Wdh_ctrl_l``^2 = mult^2 s^2 fan_in rms(Delta a)^2 in expectation
(:func:`random_matrix_rms`; a conv's fan-in c_in k^2, less at the zero-padded borders). Under muP it is Theta(1)
in hidden layers but ~ M^-1/2 at the readout (b_L = 1), so at small widths (e.g. from a base width of 32, or on a
CNN whose readout fan-in is spatial size x channels) the raw ``Wdh_L`` mixes a flat part and a falling one and its
slope is no exponent. Per (width, step) cell the check stores the signed D = mean_k (raw_k^2 - ctrl_k^2) over the
K replicas (the aligned part's mean square, plus noise of mean 0) and sigma_0, the standard deviation that D has
when there is no aligned part (:func:`null_variance`, exact for a dense layer, a bound for a conv):
``CoordResult.cells``, ``excess[term]["D"]``, ``["sd0"]`` and the replicas' values ``["d"]`` in the JSON. The
aligned part's width exponent s is then fitted to all cells at once, negative D included: D_M = c M^(2 s) by
weighted least squares (:func:`fit_aligned`; per step, and on the step-averaged D for the term's slope), with each
cell's variance the larger of sigma_0^2 and the replicas' own spread of D (which adds the cross term 2 <A, R> and
the seeds' spread of the aligned part A). The verdict reads this exponent (as the slope of ``Wdh_xs_l``, and of
``df_xs``) when the fit's amplitude is significant (its matched-filter statistic clears the level that keeps a term
without aligned part below a one-sided 3 sd Gaussian tail, the maximum over s accounted for) and the exponent leads
the control's at large width; elsewhere the raw term (random-matrix dominated, e.g. TP's independent readout, whose
random part *is* the Theta(1) contribution): see ``diagnostics.coord.CoordResult._read_excess``.
``Wdh_xs_l`` = sqrt(max(D, 0)) and ``Wdh_floor_l`` = sqrt(3 sigma_0) (the excess a null term reaches at 3 sd) are
shown per cell for reading, not for the verdict.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def rms(t: torch.Tensor) -> torch.Tensor:
    """Root mean square per replica: (K, ...) -> (K,)."""
    return t.detach().flatten(1).double().pow(2).mean(1).sqrt()


Z_RESOLVE = 3.0  # null standard deviations an aligned part must clear to count as resolved (``fit_aligned``)
Z_LEAD = 2.0  # standard errors within which the aligned exponent may fall short of the control's and still lead
S_GRID = np.linspace(-4.0, 4.0, 801)  # exponents of the aligned part's rms searched by fit_aligned (step 0.01)


def _upper_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _max_level(length: float, z: float) -> float:
    """The level c at which the Rice (upcrossing) bound on P(max_s Z(s) >= c) for a unit-variance Gaussian process
    whose path on the unit sphere has length ``length``, Phi-bar(c) + length / (2 pi) exp(-c^2 / 2), equals the
    one-sided tail Phi-bar(z) of a single normal variable (bisection: the bound falls with c)."""
    target, lo, hi = _upper_tail(z), z, z + 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _upper_tail(mid) + length / (2 * math.pi) * math.exp(-0.5 * mid * mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def cell_stats(d: np.ndarray, var0: np.ndarray):
    """From each replica's d = raw_k^2 - ctrl_k^2 and its null variance var0, both (widths, steps, K): per cell D
    (their mean), its null sd sigma_0 and the sd the fit uses, and D and its sd averaged over the steps (the pooled
    fit). A non-finite d (a diverged run): the fit's sd is NaN and the pooled pair None (no fit)."""
    K = d.shape[-1]
    if not np.all(np.isfinite(d)):
        return d.mean(-1), np.sqrt(var0.sum(-1)) / K, np.full(d.shape[:-1], np.nan), None, None
    D, sd0 = d.mean(-1), np.sqrt(var0.sum(-1)) / K
    # the replicas' spread of their mean (K - 1 degrees of freedom) adds what sigma_0 leaves out: the cross term
    # 2 <A, R> (variance ~ 4 A^2 ctrl^2 / n_out) and the seeds' spread of the aligned part A itself
    emp = d.var(-1, ddof=1) / K if K > 1 else np.zeros_like(D)
    sd = np.sqrt(np.maximum(sd0 ** 2, emp))
    # the steps share W(0) and the replicas, so their D are correlated: the step average's null sd is at most
    # the mean of the steps' (equality for fully correlated steps), its replicas' spread is measured directly
    sd0_bar = sd0.mean(1)
    emp_bar = d.mean(1).var(-1, ddof=1) / K if K > 1 else np.zeros_like(sd0_bar)
    return D, sd0, sd, D.mean(1), np.sqrt(np.maximum(sd0_bar ** 2, emp_bar))


def fit_aligned(widths: Sequence[float], D, sd, z: float = Z_RESOLVE) -> dict[str, np.ndarray]:
    """Fit D_M = c M^(2 s) (c >= 0) to signed values D with standard deviations sd over the widths M: the width
    exponent s of an aligned part whose mean square is D (so s is the exponent of its rms), and how sure it is.

    ``D``, ``sd``: arrays (..., n_widths) (any leading shape: each row is one fit). Weighted least squares with
    weights 1 / sd^2, negative D included (a cell whose aligned part is below its noise pulls the fit as much as
    its sd allows, none is dropped). With x = log(M / geometric mean of the widths) and g_i(s) = exp(2 s x_i) the
    amplitude is linear, c(s) = sum w D g / sum w g^2, and the least-squares s maximises the matched-filter
    statistic Z(s) = sum w D g / sqrt(sum w g^2) (chi^2(s) = sum w D^2 - Z(s)^2 where Z > 0): searched on
    ``S_GRID``, refined by the parabola through the grid maximum and its neighbours and three Newton steps on
    log Z (kept within a grid step: deterministic, vectorised over the rows). Returns arrays of the leading shape:

    * ``s``: the exponent (nan when no positive amplitude fits: Z(s) <= 0 for every s), ``se``: its Gauss-Newton
      standard error 1 / (2 c sqrt(sum w g^2) sd_wg2(x)) (sd_wg2: the standard deviation of x weighted by w g^2),
      correct to first order when the sd are the noise's;
    * ``amp``: c, the fitted D at the geometric-mean width, ``chi2``: the residual sum sum w (D - c g)^2;
    * ``z``: Z(s-hat), the significance of the amplitude; for a fixed s it is N(0, 1) when D has mean 0 and
      variance sd^2 (no aligned part), and its maximum over s is bounded by Rice's formula:
      P(max_s Z(s) >= c) <= Phi-bar(c) + theta / (2 pi) exp(-c^2 / 2), theta the length of the path of the unit
      vectors sqrt(w) g(s) / |sqrt(w) g(s)| over the grid; ``z_crit`` solves bound = Phi-bar(z) (0.00135 for
      z = 3), so ``z >= z_crit`` (``resolved``) is as rare for a null term as a 3 sd excess of one variable;
    * ``edge``: the maximum lies on the grid's edge (the exponent is not determined), never resolved.
    """
    x = np.log(np.asarray(widths, dtype=float))
    x = x - x.mean()
    D = np.asarray(D, dtype=float)
    w = 1.0 / np.asarray(sd, dtype=float) ** 2
    lead = D.shape[:-1]
    D, w = D.reshape(-1, x.size), np.broadcast_to(w, lead + (x.size,)).reshape(-1, x.size)
    parts = [_fit_rows(x, D[i:i + 2048], w[i:i + 2048], z) for i in range(0, max(D.shape[0], 1), 2048)]
    return {k: np.concatenate([p[k] for p in parts]).reshape(lead) for k in parts[0]}


def _fit_rows(x: np.ndarray, D: np.ndarray, w: np.ndarray, z: float) -> dict[str, np.ndarray]:
    """:func:`fit_aligned` on rows D, w (B, n_widths), x the centred log widths."""
    g2 = np.exp(4.0 * np.multiply.outer(S_GRID, x))  # g(s)^2, (S, W)
    num, den = (D * w) @ np.exp(2.0 * np.multiply.outer(S_GRID, x)).T, w @ g2.T  # (B, S)
    zs = num / np.sqrt(den)
    j = zs.argmax(1)
    rows = np.arange(D.shape[0])
    edge = (j == 0) | (j == S_GRID.size - 1)
    jc = np.clip(j, 1, S_GRID.size - 2)
    zl, zm, zr = zs[rows, jc - 1], zs[rows, jc], zs[rows, jc + 1]
    curv = zl - 2 * zm + zr
    shift = np.where((curv < 0) & ~edge, 0.5 * (zl - zr) / np.where(curv < 0, curv, -1.0), 0.0)
    h = S_GRID[1] - S_GRID[0]
    s = S_GRID[j] + np.clip(shift, -1.0, 1.0) * h
    for _ in range(3):  # Newton on log Z(s) = log sum w D g - log sum w g^2 / 2, kept within a grid step
        g1 = np.exp(2.0 * s[:, None] * x)
        n0, n1, n2 = ((D * w * g1 * (2 * x) ** k).sum(1) for k in range(3))
        d0, d1, d2 = ((w * g1 * g1 * (4 * x) ** k).sum(1) for k in range(3))
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = n1 / n0 - 0.5 * d1 / d0
            f2 = n2 / n0 - (n1 / n0) ** 2 - 0.5 * (d2 / d0 - (d1 / d0) ** 2)
            step = np.where((n0 > 0) & (f2 < 0) & ~edge, -f1 / f2, 0.0)
        s = np.clip(s + np.nan_to_num(step), S_GRID[j] - h, S_GRID[j] + h)
    gs = np.exp(2.0 * s[:, None] * x)  # (B, W)
    wg2 = w * gs * gs
    swg2 = wg2.sum(1)
    zmax = (D * w * gs).sum(1) / np.sqrt(swg2)
    amp = np.maximum((D * w * gs).sum(1) / swg2, 0.0)
    xbar = (wg2 * x).sum(1) / swg2
    sdx = np.sqrt(np.maximum((wg2 * (x - xbar[:, None]) ** 2).sum(1) / swg2, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(amp > 0, 1.0 / (2.0 * amp * np.sqrt(swg2) * sdx), np.inf)
    chi2 = (w * (D - amp[:, None] * gs) ** 2).sum(1)
    # the path length of the unit template: |d/ds (h / |h|)| = 2 sd_{w g^2}(x) for h = sqrt(w) g (trapezoid rule)
    m1, m2 = (w @ (g2 * x).T) / den, (w @ (g2 * x * x).T) / den
    speed = 2.0 * np.sqrt(np.maximum(m2 - m1 * m1, 0.0))
    length = 0.5 * (speed[:, 1:] + speed[:, :-1]).sum(1) * (S_GRID[1] - S_GRID[0])
    z_crit = np.array([_max_level(float(t), z) for t in length])
    positive = zmax > 0
    out = {"s": np.where(positive, s, np.nan), "se": np.where(positive, se, np.nan), "amp": amp, "chi2": chi2,
           "z": np.maximum(zmax, 0.0), "z_crit": z_crit, "edge": edge}
    out["resolved"] = (out["z"] >= z_crit) & ~edge & np.isfinite(out["se"])
    return out


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
    from ..layers import Dense
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
    reaches at z standard deviations (D > z sigma_0: a null term passes one cell with probability ~0.0013 for its
    near-Gaussian sum of n_out K quadratic forms). Both are shown per cell (``Wdh_xs_l``, ``Wdh_floor_l``); the
    verdict does not read them cell by cell but fits the signed D of all cells (:func:`fit_aligned`,
    :meth:`CoordResult._read_excess`). Returns (excess, floor)."""
    K = raw.shape[0]
    d = float((raw.double().pow(2) - ctrl.double().pow(2)).mean())
    sigma0 = math.sqrt(float(var0.double().sum())) / K
    return math.sqrt(max(d, 0.0)), math.sqrt(z * sigma0)
