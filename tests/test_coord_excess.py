"""The coordinate check's random-matrix control and aligned excess (diagnostics/coord.py).

W_l(0) Delta a_{l-1} (``Wdh_l``) is an aligned part plus a random-matrix part: what a weight of the same entry
rms drawn independently of Delta a would give, control^2 = mult^2 rms(W)^2 E_l(Delta a) (E_l: the receptive-field
energy, fan_in rms(Delta a)^2 for a dense layer). The control is checked against its defining expectation over
many independent draws (tolerances from the number of draws and the exact cumulants of a Gaussian quadratic
form), and the verdict that reads the excess against an MLP where the raw term's mixture of the two parts
fails a flat muP and against planted exponent errors that it must still catch.
"""
import math

import numpy as np
import pytest
import torch

from mulocal.algos import make_algo
from mulocal.diagnostics.coord import CoordResult, coord_batches, coord_check
from mulocal.diagnostics.excess import aligned_excess, null_variance, random_matrix_rms, rms
from mulocal.layers import Conv, Dense
from mulocal.nets import build
from mulocal.param import LayerRule, preset

DRAWS = 4000  # independent weights per oracle
Z = 5.0  # standard errors: a correct formula fails with probability < 1e-6 (CLT over DRAWS draws)
MULT, SIGMA = 0.7, 0.3  # a multiplier != 1 and an entry std, so that both must enter the control


def _rule():
    return LayerRule(role="hidden", init_std=SIGMA, multiplier=MULT, lr_scale=1.0, bias_lr_scale=1.0)


def _draws(layer, x, seed):
    """DRAWS independent Gaussian weights (entry std SIGMA) as the layer's replicas, each applied to the same x."""
    g = torch.Generator().manual_seed(seed)
    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * SIGMA)
    xs = x.unsqueeze(0).expand(DRAWS, *x.shape)
    return xs, rms(layer.forward(xs, layer.weight, False)).pow(2)  # (DRAWS,) rms(mult W x)^2


def _cumulants(G: np.ndarray, n_out: int, rows: int) -> tuple[float, float, float]:
    """Mean, variance and 4th cumulant of rms(mult W x)^2 = mult^2 / (rows n_out) sum_o w_o^T G w_o, w_o ~
    N(0, SIGMA^2 I) independent: w^T G w = SIGMA^2 sum_i lambda_i chi^2_1, kappa_r = 2^(r-1) (r-1)! sum lambda^r."""
    lam = np.linalg.eigvalsh(G) * SIGMA ** 2
    c = MULT ** 2 / (rows * n_out)
    return (c * n_out * lam.sum(), c ** 2 * n_out * 2 * (lam ** 2).sum(), c ** 4 * n_out * 48 * (lam ** 4).sum())


def _padding_counts(h: int, w: int, k: int) -> np.ndarray:
    """n(q): how many output positions of a same-padded k x k conv read input position q (k^2 in the interior)."""
    r = k // 2
    rows = np.array([min(i, r) + min(h - 1 - i, r) + 1 for i in range(h)])
    cols = np.array([min(j, r) + min(w - 1 - j, r) + 1 for j in range(w)])
    return np.outer(rows, cols)


def _check_oracle(layer, x, G, rows, expected_ctrl2):
    xs, m = _draws(layer, x, seed=1)
    mean, var, k4 = _cumulants(G, layer.fan_out, rows)
    assert mean == pytest.approx(expected_ctrl2, rel=1e-12)  # the cumulants and the receptive-field sum agree
    # E rms(mult W x)^2 = control^2 with the known entry std: the formula's expectation, to Z standard errors
    assert abs(float(m.mean()) - expected_ctrl2) <= Z * math.sqrt(var / DRAWS)
    # with each draw's own rms: m_k - control_k^2 has mean 0 (W / ||W|| uniform on the sphere)
    ctrl = random_matrix_rms(layer, layer.weight, xs)
    d = (m - ctrl.pow(2)).numpy()
    assert abs(d.mean()) <= Z * d.std(ddof=1) / math.sqrt(DRAWS)
    # with the known std the control is the expectation: mean of control^2 over draws = expected (its own spread)
    c2 = ctrl.pow(2).numpy()
    assert abs(c2.mean() - expected_ctrl2) <= Z * c2.std(ddof=1) / math.sqrt(DRAWS)
    # the null variance: the draws' sample variance, to Z of its standard error Var(S^2) = k4/n + 2 var^2/(n-1)
    s2 = float(m.var())
    assert abs(s2 - var) <= Z * math.sqrt(k4 / DRAWS + 2 * var ** 2 / (DRAWS - 1))
    # null_variance with each draw's own control bounds the spread of m_k - control_k^2 (given ||W||): its sample
    # variance is below their mean, to Z of its large-sample standard error sqrt((mu_4 - S^4) / n)
    v0 = null_variance(layer, xs, ctrl).numpy()
    dc = d - d.mean()
    assert dc.var() <= v0.mean() + Z * math.sqrt(((dc ** 4).mean() - dc.var() ** 2) / DRAWS)
    return ctrl, v0


def test_control_is_the_independent_weight_expectation_dense():
    """Identity: for W independent of x with i.i.d. zero-mean entries of rms s, E rms(mult W x)^2 = mult^2 s^2
    fan_in rms(x)^2 = control^2, and Var = 2 control^4 tr(G^2) / (n_out tr(G)^2), G = X^T X (null_variance, exact
    for a dense layer). If it fails, the control subtracts the wrong random-matrix part (a missing multiplier or
    sqrt(fan_in)), and every excess and its resolution floor are off."""
    torch.manual_seed(0)
    B, n_in, n_out = 7, 12, 5
    x = torch.randn(B, n_in, dtype=torch.float64) * torch.linspace(0.2, 2.0, n_in, dtype=torch.float64)
    layer = Dense("hidden", n_in, n_out, DRAWS, False, _rule(), torch.float64, "cpu")
    expected = MULT ** 2 * SIGMA ** 2 * n_in * float(x.pow(2).mean())
    G = (x.T @ x).numpy()
    ctrl, v0 = _check_oracle(layer, x, G, B, expected)
    # exact for a dense layer: 2 control^4 tr(G^2) / (n_out tr(G)^2), G from the probe
    ratio = float(np.trace(G @ G) / np.trace(G) ** 2)
    assert v0 == pytest.approx((2 * ctrl.pow(4) * ratio / n_out).numpy(), rel=1e-10)


def test_control_is_the_independent_weight_expectation_conv_with_padding():
    """Identity: for a same-padded conv, E rms(mult W * x)^2 = mult^2 s^2 sum_{b,c,q} x_bcq^2 n(q) / (B H W), n(q) the
    output positions that read input position q (k^2 inside, fewer at the zero-padded borders), so the control is
    below mult s sqrt(c_in k^2) rms(x), and the bound 2 control^4 / n_out of null_variance is >= the exact variance
    2 control^4 tr(G^2) / (n_out tr(G)^2), G = the zero-padded patch matrix's Gram. If it fails the conv control
    ignores the padding (on a 5 x 5 map most positions are borders) or the conv's fan-in."""
    torch.manual_seed(0)
    B, c_in, c_out, k, H, W = 2, 3, 4, 3, 5, 5
    x = torch.randn(B, c_in, H, W, dtype=torch.float64) + 0.5
    layer = Conv("hidden", c_in, c_out, k, DRAWS, False, _rule(), torch.float64, "cpu")
    n = _padding_counts(H, W, k)
    expected = MULT ** 2 * SIGMA ** 2 * float((x.pow(2).numpy() * n).sum()) / (B * H * W)
    unpadded = MULT ** 2 * SIGMA ** 2 * c_in * k * k * float(x.pow(2).mean())
    Z_ = torch.nn.functional.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(-1, c_in * k * k)  # rows b, p
    G = (Z_.T @ Z_).numpy()
    ctrl, v0 = _check_oracle(layer, x, G, B * H * W, expected)
    # the oracle can tell: ignoring the padding is off by far more than the tolerance
    assert unpadded - expected > 100 * math.sqrt(_cumulants(G, c_out, B * H * W)[1] / DRAWS)
    # a conv takes the bound tr(G^2) <= tr(G)^2: 2 control^4 / n_out, above the exact value
    ratio = float(np.trace(G @ G) / np.trace(G) ** 2)
    assert v0 == pytest.approx((2 * ctrl.pow(4) / c_out).numpy(), rel=1e-10) and ratio < 1


def test_aligned_excess_pools_squares_and_floors_at_z_null_sd():
    """Definition: excess = sqrt(max(mean_k (raw_k^2 - ctrl_k^2), 0)), floor = sqrt(z sqrt(sum_k var0_k) / K): a
    term equal to its control has no excess, and one whose square exceeds it by D has excess sqrt(D). If it
    fails, the verdict reads a mis-scaled excess."""
    ctrl = torch.tensor([0.5, 0.7])
    raw = (ctrl.pow(2) + torch.tensor([0.09, 0.07])).sqrt()
    xs, floor = aligned_excess(raw, ctrl, torch.tensor([0.01, 0.03]), z=3.0)
    assert xs == pytest.approx(math.sqrt(0.08)) and floor == pytest.approx(math.sqrt(3 * math.sqrt(0.04) / 2))
    assert aligned_excess(ctrl * 0.9, ctrl, torch.tensor([0.01, 0.01]))[0] == 0.0


def _table(slope: float, widths=(32, 64, 128), steps: int = 2, at: float = 1.0):
    return [[at * (w / widths[0]) ** slope] * steps for w in widths]


@pytest.mark.parametrize("xs_slope,ctrl_slope,floor,read,why", [
    (0.0, -0.5, 0.1, "Wdh_xs_2", "aligned"),              # resolved, leads: the excess
    (-0.3, 0.0, 0.1, "Wdh_2", "random-matrix led"),       # resolved, but the control leads at large width
    (0.0, 0.0, 5.0, "Wdh_2", "random-matrix dominated"),  # below the floor everywhere
])
def test_verdict_reads_the_excess_only_where_resolved_and_leading(xs_slope, ctrl_slope, floor, read, why):
    """The rule of CoordResult._read_excess on tables written by hand (no replicas' cells: D = xs^2 and
    sigma_0 = floor^2 / 3 per cell): the counted term is replaced by its excess only when the aligned part is
    resolved over the cells and grows at least as fast as the control; the verdict (max_abs_slope) reads the
    replacement and max_abs_slope_raw the raw term (tests/test_coord_fit.py: the fit itself, on cells). If it fails,
    a noise-level excess (or a vanishing one hidden by a leading random part) decides the verdict."""
    widths = [32, 64, 128]
    xs, ctrl = _table(xs_slope), _table(ctrl_slope)
    raw = [[math.hypot(a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(xs, ctrl)]
    res = CoordResult(widths, 2, {"Wdh_2": raw, "Wdh_ctrl_2": ctrl, "Wdh_xs_2": xs,
                                  "Wdh_floor_2": _table(0.0, at=floor)}, ["Wdh_2"])
    assert res.counted == [read] and res.excess["Wdh_2"]["read"] == read and why in res.excess["Wdh_2"]["why"]
    assert res.max_abs_slope == pytest.approx(abs(res.slopes[read]))
    assert res.max_abs_slope_raw == pytest.approx(abs(res.slopes["Wdh_2"]))
    if read == "Wdh_xs_2":
        assert res.slopes["Wdh_xs_2"] == pytest.approx(xs_slope, abs=1e-3)
    d = res.to_dict()
    assert d["excess"]["Wdh_2"]["read"] == read and d["counted"] == [read]


# ------------------------------------------------------------------------------------------ coordinate checks
WIDTHS = [32, 64, 128, 256]


def _mlp_check(data, param, algo="bp"):
    batches, probe = coord_batches(data, 3, 64, seed=0)
    return coord_check(lambda w: build("mlp", data.input_shape, 10, w, param, K=4, seeds=range(4)),
                       make_algo(algo), WIDTHS, batches, probe, 0.1, "sgd")


def test_mlp_from_base_width_32_passes_by_the_excess_and_fails_by_the_raw_term(fmnist):
    """muP keeps the aligned part of W_L(0) Delta a_{L-1} Theta(1); its random-matrix part is mult s sqrt(M)
    rms(Delta a) ~ M^-1 M^1/2 = M^-1/2 (b_L = 1), as large as the aligned part at width 32. Over widths 32-256
    (base 32, BP, 3 SGD steps) the raw readout term mixes the two and fails the 0.15 bound; its aligned part is
    resolved (fitted over all cells) and its exponent passes, and the control falls as M^-1/2. If the first part
    fails, the control or the rule removes the wrong thing; if the raw verdict passes, this no longer tests the
    excess."""
    res = _mlp_check(fmnist, preset("mup", "sgd").with_(base_width=32))
    assert res.excess["Wdh_3"]["read"] == "Wdh_xs_3" and res.excess["df"]["read"] == "df_xs", res.table()
    assert res.max_abs_slope <= 0.15, res.table()
    assert res.max_abs_slope_raw > 0.15, res.table()
    assert res.slopes["Wdh_ctrl_3"] == pytest.approx(-0.5, abs=0.15), res.table()


def test_planted_output_init_exponent_still_fails_by_the_excess(fmnist):
    """A muP with the readout init exponent b_L = 3/2 instead of 1: W_L(0) and the backpropagated Delta a_{L-1}
    each shrink by M^-1/2, so the aligned excess of W_L(0) Delta a_{L-1} goes as M^-1. The verdict reads that
    excess and must fail by more than half the planted slope. If it passes, subtracting the control hides a
    real exponent error."""
    res = _mlp_check(fmnist, preset("mup", "sgd").with_(base_width=32, b=(0.0, 0.5, 1.5)))
    assert res.excess["Wdh_3"]["read"] == "Wdh_xs_3", res.table()
    assert res.slopes["Wdh_xs_3"] <= -0.5 and res.max_abs_slope >= 0.5, res.table()
