"""A coordinate-check term's slope against log width (:func:`fit_slope`), and how much it moves with the draw of
the replicas (seeds): a jackknife over the K replicas (:func:`jackknife_slope_se`).

A term's slope (``CoordResult.slopes``) is the least-squares slope, against log width, of the step-averaged log of
the replicas' mean RMS at each width. With few replicas that mean is noisy, and the verdict, the largest |slope|
over some twenty counted terms, is biased upward by that noise: a check whose every exponent is right can read 0.2
at 4 replicas and 0.1 at 16 (docs/api.md). :func:`jackknife_slope_se` gives each slope's standard error by the
delete-one jackknife over the replicas (Efron & Stein 1981; Efron & Tibshirani 1993, ch. 11): with s_(i) the slope
from the means without replica i,

    se^2 = (K - 1) / K * sum_i (s_(i) - s_(.))^2,      s_(.) = mean_i s_(i),

which for a smooth function of means equals the delta-method standard error to first order and, by the Efron-Stein
inequality, does not underestimate the variance on average. The replicas are independent draws at every width, so
deleting one is deleting an independent unit. It needs K >= 2 (nan otherwise, or where a mean is not positive).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def slopes_of(widths: Sequence[float], log_values: np.ndarray) -> np.ndarray:
    """Least-squares slopes of ``log_values`` (widths, ...) against log width, one per trailing index."""
    x = np.log(np.asarray(widths, float))
    x = x - x.mean()
    y = np.asarray(log_values, float)
    return np.tensordot(x, y - y.mean(0), axes=(0, 0)) / (x @ x)


def fit_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(width); nan if any value is not positive."""
    v = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        return float("nan")
    return float(slopes_of(widths, np.log(v)))


def jackknife_slope_se(widths: Sequence[float], reps) -> float:
    """Delete-one-replica jackknife standard error of a term's slope; ``reps`` (widths, steps, K): each replica's
    RMS per width and step. The slope is that of log(step-geometric mean of the replica mean) (module docstring)."""
    r = np.asarray(reps, float)
    if r.ndim != 3 or r.shape[-1] < 2 or not np.all(np.isfinite(r)):
        return float("nan")
    K = r.shape[-1]
    loo = (r.sum(-1, keepdims=True) - r) / (K - 1)  # (widths, steps, K): the means without replica i
    if np.any(loo <= 0):
        return float("nan")
    s = slopes_of(widths, np.log(loo).mean(1))  # (K,)
    return float(np.sqrt((K - 1) / K * np.sum((s - s.mean()) ** 2)))
