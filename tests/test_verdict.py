"""The verdict rule's treatment of controls that diverge at every learning rate, and its two-sided separation.

A family whose seed-mean metric is infinite at every LR of the grid at some width (depth) has no best LR there:
the optimum lies below the grid. Such *censored* values enter the control's slope at the grid point below the
grid (an upper bound on the best LR), where that can only raise the least-squares slope (the values above the mean
log width): the bounded slope is an upper bound on the control's slope, so the one-sided gap is a lower bound.
"""
from __future__ import annotations

import math

import numpy as np

from mulocal.sweep.table import format_table
from mulocal.sweep.transfer import analyze
from mulocal.sweep.verdict import verdict, verdicts

WIDTHS, LRS, SEEDS = [64, 128, 256, 512], [2.0 ** k for k in range(-6, 3)], [0, 1]


def _rows(param: str, x_star, diverge_above: float, noise: float = 0.002, rng_seed: int = 0) -> list[dict]:
    """Store-like rows of a loss 0.3 + 0.05 (log2 lr - x*(w))^2 (+ seed noise), diverged above x*(w) + diverge_above."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for w in WIDTHS:
        for lr in LRS:
            for s in SEEDS:
                x = math.log2(lr)
                div = x > x_star(w) + diverge_above
                loss = math.inf if div else 0.3 + 0.05 * (x - x_star(w)) ** 2 + noise * rng.standard_normal()
                cfg = {"algo": "bp", "param": param, "optimizer": "sgd", "dataset": "synthetic", "width": w, "lr": lr,
                       "seed": s}
                rows.append({"config": cfg, "width": w, "lr": lr, "seed": s, "status": "diverged" if div else "done",
                             "train_loss": loss, "test_loss": loss, "test_accuracy": None if div else 0.8})
    return rows


def _collapsing(w: int) -> float:
    return -1.0 - 3.0 * math.log2(w / 64)  # optimum 2^-1, 2^-4, 2^-7, 2^-10: the grid (2^-6..) misses 256 and 512


def test_a_control_diverging_at_every_lr_deep_down_is_bounded_and_separates():
    rep = analyze(_rows("sp", _collapsing, 0.8) + _rows("mup", lambda w: -2.4, 2.5, rng_seed=1))
    ctrl = next(f for f in rep["families"] if f["family"]["param"] == "sp")
    by_w = {e["width"]: e for e in ctrl["best"]}
    for w in (256, 512):  # every LR diverged: censored at the grid point below the grid
        assert by_w[w]["censored"] and by_w[w]["best_lr"] is None
        assert by_w[w]["lr_min"] == LRS[0] and by_w[w]["log2_bound"] == math.log2(LRS[0]) - 1
    assert not by_w[64].get("censored") and not by_w[128].get("censored")
    t = ctrl["transfer"]
    assert t["n_censored"] == 2
    # the bounded slope: least squares through the two estimates and the two bounds (independent numpy fit)
    ys = [by_w[64]["log2_best_lr"], by_w[128]["log2_best_lr"], -7.0, -7.0]
    expect = np.polyfit(np.log2(WIDTHS), ys, 1)[0]
    assert abs(t["slope_bound"] - expect) < 1e-12 and t["slope_bound_err"] > 0
    assert t["slope_bound"] >= -3.0 - 1e-9  # an upper bound on the true slope (-3 per doubling)
    assert t["slope"] is not None and abs(t["slope"] - (-3.0)) < 0.6  # the plain slope: 64 and 128 only
    (v,) = verdicts(rep)
    tl = v["train_loss"]
    assert tl["bounded"] and tl["verdict"] == "reproduced"
    mup = next(f for f in rep["families"] if f["family"]["param"] == "mup")
    assert abs(tl["gap"] - (mup["transfer"]["slope"] - t["slope_bound"])) < 1e-12
    text = format_table(rep)
    assert "<0.0156" in text and "[<=" in text and "optimum lies below" in text


def test_a_control_diverging_only_at_the_small_end_is_not_bounded():
    """Lowering a value left of the mean log width raises the slope: no bound, the plain slope is judged."""
    x = lambda w: -9.0 if w == 64 else -2.0  # noqa: E731  (diverges at every LR at width 64 only)
    rep = analyze(_rows("sp", x, 0.8))
    t = rep["families"][0]["transfer"]
    assert t["n_censored"] == 1 and t["slope_bound"] is None and t["slope_bound_err"] is None


def test_separation_is_two_sided_and_one_sided_on_a_bound():
    # a control whose optimum rises with depth is separated (the PC control without its depth factor)
    up = verdict({"slope": 0.0, "slope_err": 0.1}, {"slope": 0.9, "slope_err": 0.3})
    assert up["verdict"] == "reproduced" and up["separated"] and not up["bounded"]
    assert verdict({"slope": 0.0, "slope_err": 0.1}, {"slope": 0.5, "slope_err": 0.3})["verdict"] == "not separated"
    # a bounded control is judged one-sided on its bound: its drift is downward by the data
    b = verdict({"slope": 0.0, "slope_err": 0.1}, {"slope": -1.0, "slope_err": 0.1, "slope_bound": 0.9,
                                                    "slope_bound_err": 0.1})
    assert b["bounded"] and b["verdict"] == "not separated" and abs(b["gap"] + 0.9) < 1e-12
    b2 = verdict({"slope": 0.0, "slope_err": 0.1}, {"slope": None, "slope_err": None, "slope_bound": -1.2,
                                                     "slope_bound_err": 0.2})
    assert b2["verdict"] == "reproduced" and abs(b2["gap_err"] - math.hypot(0.1, 0.2)) < 1e-12
