"""The coordinate check's fit of the aligned part's width exponent (diagnostics/coord.py: fit_aligned, and
CoordResult._read_excess, which reads it).

Per (width, step) cell the check measures D = mean_k (raw_k^2 - ctrl_k^2), the aligned part's mean square plus noise
of mean 0, and its standard deviation; fit_aligned fits D = c M^(2 s) to all widths by weighted least squares,
negative D included. Checked here against synthetic D of a known exponent and known Gaussian noise (the exponent, its
standard error's coverage, the significance's false-resolution rate under the null), and on planted tables and a
real TP check for what the verdict then reads.
"""
import json
import math

import numpy as np
import pytest

from mulocal.algos import make_algo
from mulocal.diagnostics.coord import CoordResult, coord_batches, coord_check
from mulocal.diagnostics.excess import S_GRID, Z_RESOLVE, fit_aligned
from mulocal.nets import build
from mulocal.param import preset

WIDTHS = np.array([64.0, 128.0, 256.0, 512.0])
N = 4000  # synthetic replications per case
P1, P2 = 0.6827, 0.9500  # normal coverage of 1 and 1.96 standard errors
TAIL = 0.5 * math.erfc(Z_RESOLVE / math.sqrt(2))  # Phi-bar(3) = 0.00135


def _binomial_tol(p: float, n: int) -> float:
    """4 binomial standard deviations: a correct coverage misses with probability < 1e-4."""
    return 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("s,sd", [
    # the readout's case: noise sd ~ ctrl^2 ~ M^-1, as large as D at the smallest width (a cell rule could not
    # resolve 64 or 128: D / sd = 1, 2.6)
    (0.2, 0.01 * (64 / WIDTHS)),
    # a falling aligned part whose two smallest widths are below 3 sd (D / sd = 0.5, 1.5, 4.6, 14)
    (-0.2, 0.02 * (64 / WIDTHS) ** 2),
    # resolved at every width (D / sd >= 20)
    (0.25, np.full(4, 0.0005)),
])
def test_fit_recovers_a_known_exponent_with_a_calibrated_standard_error(s, sd):
    """D = 0.01 (M / 64)^(2 s) + N(0, sd^2) over widths 64-512, N independent draws: the fitted exponent is unbiased
    to a quarter of its standard error (a first-order unbiased estimator's bias is of second order), and the true
    exponent lies within 1 and 1.96 reported standard errors in 68.3% and 95% of the draws (to 4 binomial sd). If it
    fails, the weights, the exponent's factor 2 (D is a square) or the Gauss-Newton standard error is wrong."""
    rng = np.random.default_rng(0)
    mean = 0.01 * (WIDTHS / 64) ** (2 * s)
    fit = fit_aligned(WIDTHS, mean + rng.standard_normal((N, 4)) * sd, sd)
    assert fit["resolved"].mean() >= 0.99  # a clear aligned part: resolved overall whatever its smallest widths
    err, se = fit["s"] - s, fit["se"]
    assert abs(err.mean()) <= 0.25 * se.mean(), (err.mean(), se.mean())
    assert abs(np.mean(np.abs(err) <= se) - P1) <= _binomial_tol(P1, N)
    assert abs(np.mean(np.abs(err) <= 1.96 * se) - P2) <= _binomial_tol(P2, N)
    # without noise the fit is exact, and the amplitude is D at the geometric-mean width
    exact = fit_aligned(WIDTHS, mean, sd)
    assert exact["s"] == pytest.approx(s, abs=1e-3) and exact["chi2"] == pytest.approx(0, abs=1e-5)
    assert exact["amp"] == pytest.approx(0.01 * (math.sqrt(WIDTHS[0] * WIDTHS[-1]) / 64) ** (2 * s), rel=1e-3)


def test_a_term_without_aligned_part_is_resolved_no_more_often_than_a_3_sd_excess():
    """D = N(0, sd^2) (no aligned part; the readout's sd ~ M^-1): the fit maximises its significance over the
    exponent, so the plain 3 sd level is crossed far more often than Phi-bar(3) = 0.00135; the level z_crit (Rice's
    bound over the searched exponents) brings the false resolution back below it (to 4 binomial sd). If it fails, a
    noise-level D is read as an aligned part (e.g. TP's readout)."""
    rng = np.random.default_rng(1)
    n = 20000
    sd = 0.01 * (64 / WIDTHS)
    fit = fit_aligned(WIDTHS, rng.standard_normal((n, 4)) * sd, sd)
    assert fit["resolved"].mean() <= TAIL + _binomial_tol(TAIL, n), fit["resolved"].mean()
    assert (fit["z"] >= Z_RESOLVE).mean() > TAIL + _binomial_tol(TAIL, n)  # the search over s matters
    assert np.all(fit["z_crit"] > Z_RESOLVE)
    # D <= 0 everywhere: no positive amplitude, no exponent
    none = fit_aligned(WIDTHS, -np.abs(rng.standard_normal(4)) * sd, sd)
    assert math.isnan(none["s"]) and none["z"] == 0 and not none["resolved"]


# ------------------------------------------------------------------------------------------ the verdict's reading
W3 = [64, 128, 256, 512]


def _planted(D, sd0, ctrl_slope, K=4):
    """A CoordResult whose term Wdh_2 has cells D [width][step] with null sd sd0, K replicas that agree (their
    spread adds nothing), and a control of slope ctrl_slope; the raw rows are sqrt(max(D, 0) + ctrl^2)."""
    D, sd0 = np.asarray(D, float), np.asarray(sd0, float)
    ctrl = 0.2 * (np.asarray(W3, float)[:, None] / 64) ** ctrl_slope * np.ones_like(D)
    raw = np.sqrt(np.maximum(D, 0) + ctrl ** 2)
    var0 = (sd0 ** 2 * K)[..., None] * np.ones(K)  # sum_k var0_k / K^2 = sd0^2
    return CoordResult(W3, D.shape[1], {"Wdh_2": raw.tolist(), "Wdh_ctrl_2": ctrl.tolist(),
                                        "Wdh_xs_2": np.sqrt(np.maximum(D, 0)).tolist(),
                                        "Wdh_floor_2": np.sqrt(Z_RESOLVE * sd0).tolist()}, ["Wdh_2"],
                       cells={"Wdh_2": {"d": np.repeat(D[..., None], K, -1).tolist(), "var0": var0.tolist()}})


# the CNN PC readout's null sd at 64-512 channels (its floors 0.148, 0.100, 0.067, 0.049 = sqrt(3 sd0))
SD0_CNN = np.array([0.0073, 0.0033, 0.0015, 0.00079])[:, None] * np.ones(3)
WIGGLE = np.array([[1.1, 1.0, 0.9], [0.95, 1.05, 1.0], [1.0, 0.9, 1.1], [1.05, 1.0, 0.95]])


@pytest.mark.parametrize("D,sd0,ctrl_slope,read,why,slope", [
    # a flat aligned part of rms 0.1 whose cells at 64 and 128 channels are within 3 sd (negative at 64, step 3),
    # under a control falling as M^-1/2: read the fitted exponent, ~0
    (0.01 * WIGGLE * np.array([[1, 1, -0.5], [1, 1, 1], [1, 1, 1], [1, 1, 1]]), SD0_CNN, -0.5, "Wdh_xs_2",
     "aligned part resolved", (-0.15, 0.15)),
    # an aligned part falling as M^-0.6, resolved everywhere: its exponent (and the verdict fails)
    (0.01 * WIGGLE * (np.array(W3)[:, None] / 64) ** -1.2, SD0_CNN / 10, -1.0, "Wdh_xs_2", "aligned part resolved",
     (-0.7, -0.5)),
    # resolved, but the control grows faster: the raw term (it tends to the control's exponent)
    (0.01 * WIGGLE * (np.array(W3)[:, None] / 64) ** -0.6, SD0_CNN / 10, 0.0, "Wdh_2", "random-matrix led", None),
    # noise about 0 (no aligned part): the raw term
    (SD0_CNN * np.array([[0.5, -1, 0.3], [-0.4, 1, -1], [1.2, -0.3, 0.1], [-0.8, 0.6, -0.2]]), SD0_CNN, -0.5,
     "Wdh_2", "not resolved", None),
])
def test_verdict_reads_the_fitted_exponent_where_the_aligned_part_is_resolved_and_leads(D, sd0, ctrl_slope, read,
                                                                                      why, slope):
    """CoordResult._read_excess on planted cells: the counted Wdh_2 becomes Wdh_xs_2, whose slope is the pooled fit's
    exponent (and its per-step slopes the per-step fits'), when the aligned part is resolved over all cells and leads
    the control; the raw term otherwise. max_abs_slope reads the choice, max_abs_slope_raw the raw term, and the JSON
    keeps every cell's D and sd (finite JSON). If the first case fails, cells within their noise (a negative D) veto
    a clear flat aligned part again; if the last two fail, a noise-level or non-leading excess decides the verdict."""
    res = _planted(D, sd0, ctrl_slope)
    e = res.excess["Wdh_2"]
    assert res.counted == [read] and e["read"] == read and why in e["why"], e["why"]
    assert res.max_abs_slope == pytest.approx(abs(res.slopes[read]))
    assert res.max_abs_slope_raw == pytest.approx(abs(res.slopes["Wdh_2"]))
    assert res.slopes["Wdh_xs_2"] == e["slope"] or math.isnan(e["slope"])
    per = fit_aligned(W3, np.asarray(e["D"]).T, np.asarray(e["sd"]).T)
    assert np.allclose(res.slopes_per_step["Wdh_xs_2"], per["s"], equal_nan=True)
    if slope is not None:
        assert slope[0] <= e["slope"] <= slope[1] and e["resolved"]
    # the share of cells above 3 null sd (< 1 in the first case: the old all-cells rule read the raw term there)
    assert e["cells_resolved"] == pytest.approx(np.mean(D > Z_RESOLVE * sd0))
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["excess"]["Wdh_2"]["read"] == read and d["counted"] == [read]
    assert np.allclose(d["excess"]["Wdh_2"]["D"], D) and np.allclose(d["excess"]["Wdh_2"]["sd0"], sd0)


def test_the_exponent_search_is_bounded():
    """An aligned part beyond the searched exponents (+-4) is not read: its exponent is not determined."""
    D = 0.01 * (np.asarray(W3, float)[:, None] / 64) ** -10 * np.ones(2)
    res = _planted(D, np.full((4, 2), 1e-6), -0.5)
    assert res.excess["Wdh_2"]["read"] == "Wdh_2" and "not determined" in res.excess["Wdh_2"]["why"]
    assert S_GRID[0] == -4 and S_GRID[-1] == 4


def test_tp_independent_readout_is_not_read_as_resolved(fmnist):
    """TP's readout W_L(0) is independent of the Delta a_{L-1} its targets give (feedback weights of their own, b_L =
    1/2): W_L(0) Delta a_{L-1} is all random-matrix part, its D noise about 0. Over an MLP at 32-256 (3 SGD steps, 4
    seeds) the fit must not resolve it and the verdict reads the raw term; the cells stored in the result reproduce
    the per-step exponents. If it fails, the fit reads noise as an aligned part."""
    batches, probe = coord_batches(fmnist, 3, 64, seed=0)
    param = preset("mup", "sgd", algo="tp").with_(base_width=32)
    res = coord_check(lambda w: build("mlp", fmnist.input_shape, 10, w, param, K=4, seeds=range(4)),
                      make_algo("tp"), [32, 64, 128, 256], batches, probe, 0.1, "sgd")
    e = res.excess["Wdh_3"]
    assert e["read"] == "Wdh_3" and not e["resolved"] and "not resolved" in e["why"], res.table()
    assert e["z"] < e["z_crit"], res.table()
    assert np.asarray(res.cells["Wdh_3"]["d"]).shape == (4, 3, 4)
    per = fit_aligned(res.widths, np.asarray(e["D"]).T, np.asarray(e["sd"]).T)
    assert np.allclose(e["slope_per_step"], per["s"], equal_nan=True)


def test_a_diverged_cell_is_not_fitted():
    """A non-finite cell (a replica that diverged) gives no exponent: the raw term is read (its slope nan: the
    verdict is inf) and its JSON record is finite or null."""
    D = 0.01 * np.ones((4, 2))
    D[3, 1] = np.nan
    res = _planted(D, np.full((4, 2), 1e-3), -0.5)
    e = res.excess["Wdh_2"]
    assert e["read"] == "Wdh_2" and "not measured" in e["why"] and math.isnan(res.slopes["Wdh_xs_2"])
    json.dumps(res.to_dict()["excess"], allow_nan=False)


def test_cell_stats_take_the_replicas_spread_where_it_exceeds_the_null_sd():
    """``cell_stats`` on hand-made replica values (widths, steps, K) that differ across the K replicas: D is their
    mean; each cell's sd is sqrt(max(sigma_0^2, var_k(d) / K)) with sigma_0 = sqrt(sum_k var0) / K; the pooled
    (step-averaged) D is D's mean over the steps, with sd sqrt(max(mean_t sigma_0^2..., var_k(mean_t d) / K))
    (numpy written out)."""
    from mulocal.diagnostics.excess import cell_stats
    rng = np.random.default_rng(3)
    d = rng.normal(1.0, 0.5, size=(3, 2, 5))  # (widths, steps, K): replicas differ
    var0 = np.full_like(d, 1e-6)  # a tiny null variance: the replicas' spread decides
    var0[0, 0] = 4.0  # ... except in one cell, where the null sd decides
    D, sd0, sd, D_bar, sd_bar = cell_stats(d, var0)
    K = d.shape[-1]
    assert np.allclose(D, d.mean(-1), rtol=1e-14, atol=0)
    assert np.allclose(sd0, np.sqrt(var0.sum(-1)) / K, rtol=1e-14, atol=0)
    expect = np.sqrt(np.maximum(sd0 ** 2, d.var(-1, ddof=1) / K))
    assert np.allclose(sd, expect, rtol=1e-14, atol=0)
    assert sd[0, 0] == sd0[0, 0] and sd[1, 0] > sd0[1, 0]  # both branches taken
    assert np.allclose(D_bar, d.mean(-1).mean(1), rtol=1e-14, atol=0)
    expect_bar = np.sqrt(np.maximum(sd0.mean(1) ** 2, d.mean(1).var(-1, ddof=1) / K))
    assert np.allclose(sd_bar, expect_bar, rtol=1e-14, atol=0)
