"""The coordinate check's replica spread (mulocal.diagnostics.slopes; CoordResult.slope_se): each slope's standard
error by a delete-one jackknife over the replicas, against a written-out loop and against the spread of the slope
over independent draws of the replicas (the quantity it estimates)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mulocal.algos import make_algo
from mulocal.diagnostics.coord import CoordResult, coord_check
from mulocal.diagnostics.excess import cell_stats, fit_aligned
from mulocal.diagnostics.slopes import fit_slope, jackknife_slope_se
from mulocal.nets import build
from mulocal.param import preset

WIDTHS = [64, 128, 256, 512]


def _draw(rng, K, s=-0.1, noise=0.2, steps=3, widths=WIDTHS):
    """Replica RMS (widths, steps, K): c_t M^s times an independent log-normal factor per replica and width (the
    steps of one replica share it, as a replica's steps share its W(0)), plus a small per-step one."""
    c = np.array([0.5, 0.8, 1.0])[:steps]
    base = c[None, :, None] * np.asarray(widths, float)[:, None, None] ** s
    per_rep = rng.normal(0, noise, (len(widths), 1, K))
    per_step = rng.normal(0, noise / 4, (len(widths), steps, K))
    return base * np.exp(per_rep + per_step)


def test_jackknife_se_is_the_written_out_delete_one_loop():
    """se^2 = (K-1)/K sum_i (s_(i) - mean s)^2, s_(i) the slope (np.polyfit) of the step-averaged log of the mean
    without replica i."""
    rng = np.random.default_rng(3)
    reps = _draw(rng, 5)
    s = []
    for i in range(5):
        keep = np.delete(reps, i, axis=-1).mean(-1)  # (widths, steps)
        s.append(np.polyfit(np.log(WIDTHS), np.log(keep).mean(1), 1)[0])
    s = np.array(s)
    want = np.sqrt(4 / 5 * np.sum((s - s.mean()) ** 2))
    assert jackknife_slope_se(WIDTHS, reps) == pytest.approx(want, rel=1e-12)
    # and fit_slope is np.polyfit's slope
    v = reps.mean(-1)[:, 0]
    assert fit_slope(WIDTHS, v) == pytest.approx(np.polyfit(np.log(WIDTHS), np.log(v), 1)[0], rel=1e-12)


def test_jackknife_se_needs_two_replicas_and_positive_means():
    rng = np.random.default_rng(0)
    assert np.isnan(jackknife_slope_se(WIDTHS, _draw(rng, 1)))
    reps = _draw(rng, 4)
    reps[1, 0, :] = 0.0
    assert np.isnan(jackknife_slope_se(WIDTHS, reps))


@pytest.mark.parametrize("K", [4, 16])
def test_jackknife_se_estimates_the_slopes_spread_over_replica_draws(K):
    """Over N = 4000 independent draws of K replicas the mean jackknife variance matches the variance of the slope
    estimate itself. Tolerance: the Monte-Carlo sd of each side's estimate is sqrt(2 / N) ~ 2.2 % (the variance of a
    sample variance) and ~ 3 % (the jackknife variance at K = 4 has ~ 3 degrees of freedom per draw), ~ 3.7 %
    combined, so 15 % is ~ 4 combined sd; the jackknife's own bias for a smooth statistic at this noise (sd 0.2 in
    log) is second order. The slope itself is unbiased: the noise has the same law at every width, so the log of the
    replicas' mean is shifted by the same amount at every width (4 Monte-Carlo sd)."""
    rng = np.random.default_rng(11 + K)
    N = 4000
    slopes, var_jack = np.empty(N), np.empty(N)
    for n in range(N):
        reps = _draw(rng, K)
        slopes[n] = fit_slope(WIDTHS, np.exp(np.log(reps.mean(-1)).mean(1)))
        var_jack[n] = jackknife_slope_se(WIDTHS, reps) ** 2
    assert slopes.mean() == pytest.approx(-0.1, abs=4 * slopes.std() / np.sqrt(N))
    assert var_jack.mean() / slopes.var() == pytest.approx(1.0, abs=0.15)


def test_coord_result_reports_the_leading_terms_se_and_a_noise_limited_verdict():
    """A hand-built result: the verdict's term, its jackknife se (the JSON's max_abs_slope_se) and, when the verdict
    is within 2 se of the flatness floor, the table says the replicas' noise decides it."""
    rng = np.random.default_rng(5)
    noisy = _draw(rng, 4, s=-0.16, noise=0.3, steps=2)
    flat = _draw(rng, 4, s=0.0, noise=0.01, steps=2)
    reps = {"dh_1": noisy.tolist(), "h_1": flat.tolist()}
    rms = {k: np.asarray(v).mean(-1).tolist() for k, v in reps.items()}
    res = CoordResult(WIDTHS, 2, rms, ["h_1", "dh_1"], replicas=reps)
    assert res.leading == "dh_1"
    assert res.max_abs_slope == pytest.approx(abs(res.slopes["dh_1"]))
    assert res.max_abs_slope_se == pytest.approx(jackknife_slope_se(WIDTHS, noisy), rel=1e-12)
    d = res.to_dict()
    assert d["leading"] == "dh_1" and d["max_abs_slope_se"] == res.max_abs_slope_se
    assert d["slope_se"]["h_1"] < 0.01 < d["slope_se"]["dh_1"]
    table = res.table()
    assert "jackknife over 4 replicas" in table
    assert abs(res.max_abs_slope - 0.15) < 2 * res.max_abs_slope_se  # this draw: 0.079 +- 0.169
    assert "the replicas' noise decides this verdict" in table
    res_flat = CoordResult(WIDTHS, 2, {"h_1": rms["h_1"]}, ["h_1"], replicas={"h_1": reps["h_1"]})
    assert "noise decides" not in res_flat.table()


def test_the_noise_line_appears_exactly_within_2_se_of_0_15():
    """The table's noise line: exactly where |max |slope| - 0.15| < 2 se (the constants written here), over draws
    on both sides of the band (pins the floor and the factor: 0.1 or 3 se would disagree on some draws)."""
    rng = np.random.default_rng(8)
    inside = outside = 0
    for n in range(60):
        reps = _draw(rng, 6, s=rng.uniform(-0.45, 0.45), noise=rng.uniform(0.02, 0.2), steps=2)
        res = CoordResult(WIDTHS, 2, {"dh_1": reps.mean(-1).tolist()}, ["dh_1"], replicas={"dh_1": reps.tolist()})
        slope = np.polyfit(np.log(WIDTHS), np.log(reps.mean(-1)).mean(1), 1)[0]
        want = abs(abs(slope) - 0.15) < 2 * jackknife_slope_se(WIDTHS, reps)
        assert ("the replicas' noise decides this verdict" in res.table()) == want, (slope, res.max_abs_slope_se)
        inside, outside = inside + want, outside + (not want)
    assert inside >= 5 and outside >= 5


def test_coord_check_keeps_every_replicas_values_whose_mean_is_the_table():
    """coord_check's replicas: [width][step][replica], their mean the rms table; a replica's own run (K = 1 with its
    seed) gives its column."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)
    batches, probe = [(x[:16], y[:16]), (x[16:32], y[16:32])], x[32:]

    def net(K, seeds):
        return lambda w: build("mlp", (1, 8, 8), 10, w, preset("mup", "sgd"), K=K, seeds=seeds, dtype=torch.float64)

    res = coord_check(net(3, [4, 5, 6]), make_algo("bp"), [16, 32], batches, probe, 0.1)
    for name, table in res.rms.items():
        if name.startswith(("Wdh_xs", "Wdh_floor", "df_xs", "df_floor")):  # pooled over the replicas
            continue
        assert np.allclose(np.asarray(res.replicas[name]).mean(-1), table, rtol=1e-12, atol=0), name
    one = coord_check(net(1, [5]), make_algo("bp"), [16, 32], batches, probe, 0.1)
    assert np.allclose(np.asarray(res.replicas["dh_1"])[..., 1], np.asarray(one.rms["dh_1"]), rtol=1e-10)
    assert np.isfinite(res.slope_se["dh_1"]) and np.isnan(one.slope_se["dh_1"])
    for name, e in res.excess.items():  # an aligned excess' se: the pooled fit's of the exponent of its rms
        xs = name.replace("Wdh_", "Wdh_xs_") if name != "df" else "df_xs"
        _, _, _, D_bar, sd_bar = cell_stats(np.asarray(res.cells[name]["d"]), np.asarray(res.cells[name]["var0"]))
        fit = fit_aligned(res.widths, D_bar, sd_bar)
        assert res.slope_se[xs] == pytest.approx(float(fit["se"]), rel=1e-12) and np.isfinite(fit["se"]), name
        assert xs not in res.replicas  # one pooled value per cell, no replicas
    assert res.excess


def test_checks_over_disjoint_replicas_join_into_the_check_of_all():
    """join(check of seeds 0-1, check of seeds 2-4) = the check of seeds 0-4 in one batched model (a replica equals
    its own run): every table, slope, slope se, excess reading and the verdict, to rounding."""
    from mulocal.diagnostics.coord import join
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (48,), generator=g)
    batches, probe = [(x[:16], y[:16]), (x[16:32], y[16:32])], x[32:]

    def check(seeds):
        return coord_check(lambda w: build("mlp", (1, 8, 8), 10, w, preset("mup", "sgd"), K=len(seeds), seeds=seeds,
                                           dtype=torch.float64), make_algo("pc"), [16, 32, 64], batches, probe, 0.1)

    whole, joined = check([0, 1, 2, 3, 4]), join([check([0, 1]), check([2, 3, 4])])
    assert set(joined.rms) == set(whole.rms) and joined.counted == whole.counted
    for name in whole.rms:
        assert np.allclose(joined.rms[name], whole.rms[name], rtol=1e-10, atol=1e-14), name
        assert joined.slopes[name] == pytest.approx(whole.slopes[name], rel=1e-8, abs=1e-10), name
    for name in whole.slope_se:
        assert joined.slope_se[name] == pytest.approx(whole.slope_se[name], rel=1e-8, abs=1e-12), name
    for name, e in whole.excess.items():
        assert joined.excess[name]["read"] == e["read"] and joined.excess[name]["se"] == pytest.approx(e["se"])
    assert joined.max_abs_slope == pytest.approx(whole.max_abs_slope, rel=1e-8)
    assert joined.leading == whole.leading and len(joined.replicas["dh_1"][0][0]) == 5
