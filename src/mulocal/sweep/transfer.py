"""muTransfer analysis of a sweep: the best learning rate per width, its drift with width, the penalty.

Cells are grouped into *families* (identical configuration except width, learning rate and
seed). For each family and width:

* the metric (default: final-epoch training loss) is averaged over seeds at every learning
  rate; a diverged cell counts as an infinite loss, so any diverged seed makes that learning
  rate's mean infinite (missing, unfinished cells are left out of the mean);
* the best learning rate is the vertex of a quadratic fitted in log2(lr) to the grid minimum
  and its finite neighbours (up to two on each side, else one), if that quadratic opens upward
  and its vertex lies inside the fitted points; otherwise the grid minimum itself (``method``
  says which; ``at_edge`` flags a minimum on the first or last learning rate of the grid, where
  the true optimum may lie outside it);
* its uncertainty is the standard deviation, in log2 units, of the same estimate over bootstrap
  resamples of the seeds *and of the fit window*: each resample also draws the window's half-width
  (1, 2 or 3 grid points each side), and where the estimate falls back to the grid minimum it is
  spread uniformly over that grid cell (+- half a grid step: the optimum lies anywhere there). The
  error thus includes the LR grid's resolution, not seed noise alone (None with a single seed);
* where the seed-mean metric is infinite at every learning rate (every LR diverged for some seed), there is no
  best LR: the value is *censored* (``censored``, ``lr_min``), its optimum below the grid, and ``log2_bound``
  (the grid point below the grid) bounds it from above.

``axis="depth"`` (depth transfer, residual nets): families differ in everything but depth, learning rate and
seed, and every "width" of the report below is read as the depth H (the report says ``"axis": "depth"``; its
per-value entries keep the key ``width``).

Per family, the transfer metrics are the least-squares slope of log2(best lr) against
log2(width) (0 means the optimum transfers; SP under SGD typically gives a negative slope), with
its regression standard error (3+ widths) and its bootstrap spread (seeds and fit windows, as above;
``slope_err`` is the larger of the two), and the *penalty*: the
mean metric at the largest width when trained at the smallest width's best learning rate,
minus the best mean metric at the largest width (read off the fitted quadratic where the
learning rate is inside it, else interpolated linearly in log2(lr) between grid points). With censored values
at the large widths, ``slope_bound`` is the slope with them at their bounds (an upper bound on the slope; the
verdict reads it for a control, ``sweep.verdict``).
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from ..config import canonical_json, config_hash, family_of
from .store import flatten

METRICS = ("train_loss", "test_loss", "test_accuracy")
SHOWN_ALWAYS = ("algo", "param", "optimizer")
HIDDEN = ("param_resolved.", "algo_resolved.")  # follow from the shown keys


# ------------------------------------------------------------------------------------- estimators
def mean_curve(M: np.ndarray) -> np.ndarray:
    """Mean over seeds (rows) per learning rate (columns): NaN entries (missing) are skipped, any +inf
    (diverged) makes the mean +inf, a column with nothing is NaN."""
    M = np.asarray(M, dtype=float)
    out = np.full(M.shape[1], np.nan)
    for j in range(M.shape[1]):
        col = M[:, j]
        col = col[~np.isnan(col)]
        if len(col) == 0:
            continue
        out[j] = math.inf if np.isinf(col).any() else float(col.mean())
    return out


def best_of_curve(x: Sequence[float], y: Sequence[float], halves: Sequence[int] = (2, 1)) -> dict | None:
    """The minimum of y(x) on a sorted grid x: quadratic vertex near the grid minimum, else the grid minimum.

    Returns {"x", "value", "method" ("quadratic" | "argmin"), "at_edge", "grid_index", "window" (x range of the
    fitted points), "coef" (a, b, c of a x^2 + b x + c), "log"}, or None when no point is finite.
    A positive curve (a loss) is fitted in log(y): loss curves rise steeply past the optimum, and a parabola in
    y itself would put its vertex below every measured point. ``halves``: the fit windows tried in turn, as
    the number of grid points each side of the minimum (the report uses (2, 1); the bootstrap varies it).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    finite = np.isfinite(y)
    if not finite.any():
        return None
    logy = bool(np.all(y[finite] > 0))
    i = int(np.argmin(np.where(finite, y, np.inf)))
    n = len(y)
    base = {"x": float(x[i]), "value": float(y[i]), "method": "argmin", "at_edge": i == 0 or i == n - 1,
            "grid_index": i, "window": None, "coef": None, "log": logy}
    for half in halves:
        lo = i
        while lo > 0 and i - lo < half and finite[lo - 1]:
            lo -= 1
        hi = i
        while hi < n - 1 and hi - i < half and finite[hi + 1]:
            hi += 1
        if lo == i or hi == i:
            break  # no finite neighbour on one side: the minimum is not bracketed
        xs, ys = x[lo:hi + 1], y[lo:hi + 1]
        a, b, c = np.polyfit(xs, np.log(ys) if logy else ys, 2)
        if a > 0:
            xv = -b / (2 * a)
            if xs[0] <= xv <= xs[-1]:
                v = a * xv * xv + b * xv + c
                return {**base, "x": float(xv), "value": float(np.exp(v) if logy else v), "method": "quadratic",
                        "window": [float(xs[0]), float(xs[-1])], "coef": [float(a), float(b), float(c)]}
    return base


def value_at(x: Sequence[float], y: Sequence[float], best: dict | None, x0: float) -> tuple[float, str]:
    """The curve's value at x0: on the fitted quadratic if x0 is inside its window, else linear between the
    grid points around x0 (the nearest one if a neighbour is not finite, the end point outside the grid)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if best and best["method"] == "quadratic" and best["window"][0] <= x0 <= best["window"][1]:
        a, b, c = best["coef"]
        v = a * x0 * x0 + b * x0 + c
        return float(np.exp(v) if best.get("log") else v), "quadratic"
    if x0 <= x[0]:
        return float(y[0]), "edge" if x0 < x[0] else "grid"
    if x0 >= x[-1]:
        return float(y[-1]), "edge" if x0 > x[-1] else "grid"
    j = int(np.searchsorted(x, x0)) - 1
    t = (x0 - x[j]) / (x[j + 1] - x[j])
    if np.isfinite(y[j]) and np.isfinite(y[j + 1]):
        return float((1 - t) * y[j] + t * y[j + 1]), "linear"
    k = j if t < 0.5 else j + 1
    return float(y[k]), "nearest"


WINDOWS = (1, 2, 3)  # fit-window half-widths the bootstrap draws from


def _bootstrap(x, M, n_boot: int, rng) -> np.ndarray:
    """Best x of the seed-mean curve over bootstrap resamples of the seeds (rows of M) and of the fit window
    (a half-width drawn from ``WINDOWS``, falling back to 1); a grid-minimum estimate is spread uniformly over
    its grid cell (+- half the local grid step). NaN where none."""
    n_s = M.shape[0]
    out = np.full(n_boot, np.nan)
    if n_s < 2:
        return out
    x = np.asarray(x, float)
    steps = np.diff(x)
    for b in range(n_boot):
        rows = rng.integers(0, n_s, n_s)
        half = int(WINDOWS[rng.integers(0, len(WINDOWS))])
        jitter = rng.uniform(-0.5, 0.5)
        est = best_of_curve(x, mean_curve(M[rows]), halves=(half, 1) if half != 1 else (1,))
        if est is None:
            continue
        out[b] = est["x"]
        if est["method"] == "argmin" and len(steps):
            i = est["grid_index"]
            out[b] += jitter * float(steps[min(i, len(steps) - 1)])
    return out


def linear_fit(x, y) -> dict:
    """Least-squares line y = slope x + intercept with the slope's standard error (None below 3 points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        return {"slope": None, "intercept": None, "se": None}
    slope, intercept = np.polyfit(x, y, 1)
    se = None
    if n >= 3:
        resid = y - (slope * x + intercept)
        se = float(math.sqrt(float(resid @ resid) / (n - 2) / float(((x - x.mean()) ** 2).sum())))
    return {"slope": float(slope), "intercept": float(intercept), "se": se}


# ------------------------------------------------------------------------------------- the report
def _metric_value(row: dict, metric: str) -> float:
    """What is minimised: the loss, or 1 - accuracy. Diverged -> +inf; unfinished -> NaN."""
    if row["status"] == "diverged":
        return math.inf
    if row["status"] != "done":
        return math.nan
    if metric == "test_accuracy":
        v = row.get("test_accuracy")
        return math.nan if v is None else 1.0 - float(v)
    v = row.get(metric)
    return math.nan if v is None else float(v)


def _to_metric(metric: str, v):
    """Internal (minimised) value -> reported value."""
    if v is None:
        return None
    return 1.0 - v if metric == "test_accuracy" else v


def _labels(families: list[dict]) -> list[str]:
    flat = [flatten(f) for f in families]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
               and k not in SHOWN_ALWAYS and not k.startswith(HIDDEN)]
    out = []
    for f in flat:
        parts = [str(f.get(k)) for k in SHOWN_ALWAYS]
        parts += [f"{k.split('.')[-1]}={f.get(k)}" for k in varying if k in f]
        out.append(" ".join(parts))
    return out



def _stats(vals: list[float]) -> tuple:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None, None, None
    a = np.asarray(v)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0), float(a.min()), float(a.max())


AXES = ("width", "depth")


def _axis_value(row: dict, axis: str) -> int:
    return int(row["width"]) if axis == "width" else int(row["config"][axis])


def analyze(rows: Sequence[dict], metric: str = "train_loss", n_boot: int = 200, seed: int = 0,
            axis: str = "width") -> dict:
    """The transfer report of store rows (``Store.rows()``): per family, per-width (or, ``axis="depth"``,
    per-depth) curves and best learning rates, and the transfer metrics. See the module docstring."""
    from ..errors import ConfigError, check_choice
    check_choice("metric", metric, METRICS)
    if axis not in AXES:
        raise ConfigError(f"unknown transfer axis '{axis}'; choose width or depth")
    fams: dict[str, tuple[dict, list]] = {}
    counts = {"done": 0, "diverged": 0, "pending": 0, "running": 0, "failed": 0}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        fam = family_of(r["config"], axis)
        fams.setdefault(canonical_json(fam), (fam, []))[1].append(r)
    families = []
    for key in sorted(fams):
        fam, frows = fams[key]
        # one bootstrap stream per family: a family's numbers do not depend on what else is in the store
        rng = np.random.default_rng([seed, int(config_hash(fam)[:12], 16)])
        families.append(_family_report(fam, frows, metric, n_boot, rng, axis))
    for f, label in zip(families, _labels([f["family"] for f in families])):
        f["label"] = label
    families.sort(key=lambda f: f["label"])
    return {"metric": metric, "axis": axis,
            "estimator": "quadratic vertex in log2(lr) of the seed-mean metric (diverged = inf)",
            "cells": counts, "families": families}


def _family_report(fam: dict, rows: list[dict], metric: str, n_boot: int, rng, axis: str = "width") -> dict:
    widths = sorted({_axis_value(r, axis) for r in rows})
    per_width, curves, boots = [], [], {}
    for w in widths:
        wrows = [r for r in rows if _axis_value(r, axis) == w]
        lrs = sorted({float(r["lr"]) for r in wrows})
        seeds = sorted({int(r["seed"]) for r in wrows})
        li, si = {v: i for i, v in enumerate(lrs)}, {v: i for i, v in enumerate(seeds)}
        M = np.full((len(seeds), len(lrs)), np.nan)
        acc = np.full((len(seeds), len(lrs)), np.nan)
        for r in wrows:
            i, j = si[int(r["seed"])], li[float(r["lr"])]
            M[i, j] = _metric_value(r, metric)
            if r["status"] == "done" and r.get("test_accuracy") is not None:
                acc[i, j] = float(r["test_accuracy"])
        x = np.log2(lrs)
        mean = mean_curve(M)
        best = best_of_curve(x, mean)
        bx = _bootstrap(x, M, n_boot, rng)
        boots[w] = bx
        ok = bx[np.isfinite(bx)]
        points = []
        for j, lr in enumerate(lrs):
            col = M[:, j]
            m, s, lo, hi = _stats([_to_metric(metric, v) for v in col if not math.isnan(v)])
            am, asd, alo, ahi = _stats([v for v in acc[:, j] if not math.isnan(v)])
            points.append({"lr": lr, "mean": _to_metric(metric, float(mean[j])) if not math.isnan(mean[j]) else None,
                           "std": s, "min": lo, "max": hi, "n": int((~np.isnan(col)).sum()),
                           "n_diverged": int(np.isinf(col).sum()), "test_accuracy_mean": am,
                           "test_accuracy_std": asd, "test_accuracy_min": alo, "test_accuracy_max": ahi})
        curves.append({"width": w, "points": points})
        entry = {"width": w, "n_lrs": len(lrs), "n_seeds": len(seeds), "n_missing": int(np.isnan(M).sum()),
                 "n_diverged": int(np.isinf(M).sum())}
        if best is None:
            entry.update(best_lr=None, log2_best_lr=None, log2_std=None, method=None, at_edge=None, best_value=None,
                         grid_best_lr=None)
            if len(x) and np.isinf(mean).all():  # every LR diverged (a seed at each): the optimum is below the grid
                entry.update(censored=True, lr_min=lrs[0],
                             log2_bound=float(x[0] - (x[1] - x[0] if len(x) > 1 else 1.0)))
        else:
            entry.update(best_lr=2.0 ** best["x"], log2_best_lr=best["x"],
                         log2_std=float(ok.std(ddof=1)) if len(ok) > 1 else None, method=best["method"],
                         at_edge=best["at_edge"], best_value=_to_metric(metric, best["value"]),
                         grid_best_lr=lrs[best["grid_index"]])
        entry["_x"], entry["_mean"], entry["_best"] = x, mean, best
        per_width.append(entry)
    transfer = _transfer(per_width, boots, metric)
    for e in per_width:
        for k in ("_x", "_mean", "_best"):
            e.pop(k)
    out = {"family": fam, "widths": widths, "best": per_width, "curves": curves, "transfer": transfer}
    inference = inference_summary(rows)
    if inference:
        out["inference"] = inference
    return out


def inference_summary(rows: Sequence[dict]) -> dict | None:
    """The PC inference status of finished cells (their last epoch's ``pc_*`` columns): how many cells,
    in how many the energy rose at some inference step (and the largest fraction of steps), the median and
    largest final relative residual, how many cells ``algos.pc.status_warning`` warns about and the smallest
    learning rate among them, and how many did not converge (final relative residual above
    ``algos.pc.RESIDUAL_CONVERGED``). None when no cell kept a status (other rules; ``no_status``)."""
    from ..algos.pc import RESIDUAL_CONVERGED, status_warning
    lasts = []
    for r in rows:
        if r.get("status") != "done":
            continue
        epochs = [h for h in (r.get("history") or []) if "event" not in h]
        if epochs and any(k.startswith("pc_") for k in epochs[-1]):
            lasts.append(dict(epochs[-1], lr=r.get("lr", epochs[-1].get("lr"))))
    if not lasts:
        return None
    warned = [float(h["lr"]) for h in lasts if h.get("lr") is not None
              and status_warning(h.get("pc_energy_rose"), h.get("pc_residual")) is not None]
    rose = [h["pc_energy_rose"] for h in lasts if h.get("pc_energy_rose") is not None
            and h["pc_energy_rose"] == h["pc_energy_rose"]]
    res = [h["pc_residual"] for h in lasts if h.get("pc_residual") is not None]
    return {"cells": len(lasts), "energy_rose_cells": sum(v > 0 for v in rose),
            "energy_rose_max": max(rose) if rose else None,
            "residual_median": float(np.median(res)) if res else None, "residual_max": max(res) if res else None,
            "warned_cells": len(warned), "warned_min_lr": min(warned) if warned else None,
            "unconverged_cells": sum(v > RESIDUAL_CONVERGED for v in res), "converged_below": RESIDUAL_CONVERGED}


def _bounded_slope(per_width: list[dict], boots: dict) -> dict:
    """The slope with the *censored* values (every LR diverged there) at their bound, the grid point below the
    grid (the best LR there is lower: an upper bound), and its error (regression standard error or the bootstrap
    spread with the bounds fixed, the larger). Only where every censored value lies above the mean log2 width
    (depth) of the fitted values: lowering such a value lowers the least-squares slope, so the bounded slope is an
    upper bound on the slope with the true optima. ``n_censored`` counts them; the slope is None otherwise."""
    cens = [e for e in per_width if e.get("censored")]
    pts = [e for e in per_width if e["_best"] is not None or e.get("censored")]
    out = {"n_censored": len(cens), "slope_bound": None, "slope_bound_err": None}
    if not cens or len(pts) < 2 or len(pts) == len(cens):
        return out
    lw = np.log2([e["width"] for e in pts])
    if min(math.log2(e["width"]) for e in cens) <= lw.mean():
        return out
    fit, _, err = _slope_fit(lw, pts, boots)
    out.update(slope_bound=fit["slope"], slope_bound_err=err)
    return out


def _slope_fit(lw, pts: list[dict], boots: dict) -> tuple[dict, float | None, float | None]:
    """The least-squares line of log2(best LR) (a censored value: its bound, fixed in every resample) against
    ``lw``, the bootstrap spread of its slope (None below 2 finite resamples) and the slope's error, the larger of
    the regression's standard error and that spread."""
    def ys(b=None):
        return [e["log2_bound"] if e.get("censored") else (e["log2_best_lr"] if b is None else boots[e["width"]][b])
                for e in pts]
    fit = linear_fit(lw, ys())
    slopes = []
    for b in range(min(len(boots[e["width"]]) for e in pts if not e.get("censored"))):
        y = ys(b)
        if all(np.isfinite(y)):
            slopes.append(linear_fit(lw, y)["slope"])
    boot_std = float(np.std(slopes, ddof=1)) if len(slopes) > 1 else None
    errs = [v for v in (fit["se"], boot_std) if v is not None]
    return fit, boot_std, max(errs) if errs else None


def _transfer(per_width: list[dict], boots: dict, metric: str) -> dict:
    ok = [e for e in per_width if e["_best"] is not None]
    out = {"n_widths": len(ok), "slope": None, "slope_se": None, "slope_boot_std": None, "slope_err": None,
           "intercept": None, "base_width": None, "largest_width": None, "base_best_lr": None,
           "value_at_base_lr": None, "best_value_largest": None, "penalty": None, "penalty_relative": None,
           "penalty_lookup": None,
           **_bounded_slope(per_width, boots)}
    if len(ok) < 2:
        return out
    lw = np.log2([e["width"] for e in ok])
    fit, boot_std, err = _slope_fit(lw, ok, boots)
    base, big = ok[0], ok[-1]
    v, how = value_at(big["_x"], big["_mean"], big["_best"], base["_best"]["x"])
    best_big = big["_best"]["value"]
    penalty = max(0.0, v - best_big) if math.isfinite(v) else math.inf
    out.update(slope=fit["slope"], intercept=fit["intercept"], slope_se=fit["se"], slope_boot_std=boot_std,
               slope_err=err, base_width=base["width"], largest_width=big["width"],
               base_best_lr=base["best_lr"], value_at_base_lr=_to_metric(metric, v),
               best_value_largest=_to_metric(metric, best_big), penalty=penalty,
               penalty_relative=(penalty / abs(best_big) if best_big and math.isfinite(penalty) else
                                 (math.inf if not math.isfinite(penalty) else None)),
               penalty_lookup=how)
    return out



__all__ = ["METRICS", "analyze", "best_of_curve", "inference_summary", "linear_fit", "mean_curve", "value_at"]
