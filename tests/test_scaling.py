"""Scaling laws: coordinate checks are flat under muP and grow under SP."""
import pytest

from mulocal.algos import make_algo
from mulocal.diagnostics.coord import coord_batches, coord_check
from mulocal.diagnostics.slopes import fit_slope
from mulocal.nets import build
from mulocal.param import preset

WIDTHS = [64, 128, 256, 512, 1024]


def _coord(data, pname, opt, lr, steps=3, algo="bp", param=None, **algo_kw):
    p = param or preset(pname, opt)
    batches, probe = coord_batches(data, steps, 64, seed=0)
    return coord_check(lambda w: build("mlp", data.input_shape, 10, w, p, K=4, seeds=range(4)),
                       make_algo(algo, **algo_kw), WIDTHS, batches, probe, lr, opt)


def test_fit_slope_recovers_power_law():
    assert fit_slope([1, 2, 4, 8], [3 * w ** -0.5 for w in [1, 2, 4, 8]]) == pytest.approx(-0.5)


@pytest.mark.parametrize("opt,lr", [("sgd", 0.1), ("adam", 1e-3)])
def test_bp_mup_coordinates_flat(fmnist, opt, lr):
    res = _coord(fmnist, "mup", opt, lr)
    assert len(res.counted) == 10  # h1 h2 dh1 dh2 dWh1-3 Wdh2-3 df for 3 layers
    bad = {k: round(res.slopes[k], 3) for k in res.counted if abs(res.slopes[k]) > 0.15}
    assert not bad, res.table()
    assert res.max_abs_slope <= 0.15


def test_bp_sp_sgd_output_update_grows(fmnist):
    res = _coord(fmnist, "sp", "sgd", 0.1)
    assert res.slopes["dWh_3"] >= 0.5, res.table()
    assert res.max_abs_slope >= 0.5


def test_bp_sp_adam_output_update_grows(fmnist):
    res = _coord(fmnist, "sp", "adam", 1e-3)
    assert res.slopes["dWh_3"] >= 0.5, res.table()


# ----------------------------------------------------------------------------- predictive coding
@pytest.mark.parametrize("gbar", [-1.0, 0.0, 1.0])
def test_pc_single_shot_mup_flat_and_perturbation_law(fmnist, gbar):
    """Single-shot SI without FPA under PC's muP (c = c_SGD - gbar): every contribution Theta(1),
    and the inference perturbation of v_{L-1} scales as M^(-1 - gbar)."""
    res = _coord(fmnist, None, "sgd", 0.1, algo="pc", param=preset("mup", "sgd", gamma_bar_L=gbar),
                 T=1, inference="sequential", fpa=False)
    assert res.max_abs_slope <= 0.15, res.table()
    assert res.slopes["pert_2"] == pytest.approx(-1 - gbar, abs=0.15), res.table()


def test_pc_gnt_with_sgd_learning_rates_blows_up(fmnist):
    """gbar = -1 with SGD's muP learning rates (not shifted): updates grow with width."""
    p = preset("mup", "sgd").with_(gamma_bar_L=-1.0)
    res = _coord(fmnist, None, "sgd", 0.1, algo="pc", param=p, T=1)
    assert max(res.slopes[k] for k in res.counted) >= 0.5, res.table()


@pytest.mark.parametrize("gbar", [-1.0, 0.0, 1.0])
def test_pc_mup_adam_flat(fmnist, gbar):
    """Adam normalises gamma_L away: muP-Adam's c = (0, 1, 1) for every gbar_L, and the inference
    perturbation of v_{L-1} still scales as M^(-1 - gbar)."""
    res = _coord(fmnist, None, "adam", 1e-3, algo="pc", param=preset("mup", "adam", gamma_bar_L=gbar), T=1)
    assert res.max_abs_slope <= 0.15, res.table()
    assert res.slopes["pert_2"] == pytest.approx(-1 - gbar, abs=0.15), res.table()


# ----------------------------------------------------------------------------- target propagation
@pytest.mark.parametrize("algo", ["tp", "dtp"])
def test_tp_mup_flat_and_bL1_control_off(fmnist, algo):
    """TP/DTP under their muP (b_L = 1/2, c = (0, 1, 1)): flat; with b_L = 1 some slope is off by >= 0.3."""
    mup = _coord(fmnist, None, "sgd", 0.1, algo=algo, param=preset("mup", "sgd", algo=algo))
    assert mup.max_abs_slope <= 0.15, mup.table()
    ctrl = _coord(fmnist, None, "sgd", 0.1, algo=algo, param=preset("mup-bL1", "sgd", algo=algo))
    assert ctrl.max_abs_slope >= 0.3, ctrl.table()


def test_alignment_exponent_tp_half_bp_one(fmnist):
    """omega_L of W_L Delta h_{L-1}: about 1/2 for TP and DTP (independent), >= 0.8 for BP under muP."""
    for algo in ("tp", "dtp"):
        res = _coord(fmnist, None, "sgd", 0.1, algo=algo, param=preset("mup", "sgd", algo=algo))
        assert 0.4 <= res.alignment(3) <= 0.6, (algo, res.alignment(3))
    bp = _coord(fmnist, "mup", "sgd", 0.1)
    assert bp.alignment(3) >= 0.8, bp.alignment(3)


# ----------------------------------------------------------------------------- exponent fitter
from mulocal.diagnostics.derive import derive  # noqa: E402

FIT_CASES = [("bp", "sgd", 0.0), ("bp", "adam", 0.0), ("pc", "sgd", -1.0), ("pc", "sgd", 0.0), ("pc", "sgd", 1.0),
             ("tp", "sgd", 0.0), ("dtp", "sgd", 0.0)]


def _derive(data, algo, opt, gbar, reference):
    batches, probe = coord_batches(data, 1, 64, seed=0)
    start = preset("sp", opt, gamma_bar_L=gbar, algo=algo)

    def make(p, w):
        return build("mlp", data.input_shape, 10, w, p, K=4, seeds=range(4), bias=False)
    lr = 0.1 if opt == "sgd" else 1e-3
    return derive(make, make_algo(algo), start, WIDTHS, batches, probe, lr, opt, reference=reference)


@pytest.mark.parametrize("algo,opt,gbar", FIT_CASES)
def test_fitter_recovers_mup_table_from_sp(fmnist, algo, opt, gbar):
    """Starting from SP, the fitter lands within 0.15 of the muP table: BP-SGD (-1, 0, 1), BP-Adam
    (0, 1, 1), PC c = c_SGD - gbar_L, TP/DTP b_L = 1/2 and c = (0, 1, 1)."""
    ref = preset("mup", opt, gamma_bar_L=gbar, algo=algo)
    res = _derive(fmnist, algo, opt, gbar, ref)
    assert res.agrees, res.table()
    assert res.final.max_abs_slope <= 0.15


def test_fitter_flags_a_wrong_preset(fmnist):
    """PC with gbar_L = -1 checked against SGD's (unshifted) muP table: flagged."""
    wrong = preset("mup", "sgd").with_(gamma_bar_L=-1.0)
    res = _derive(fmnist, "pc", "sgd", -1.0, wrong)
    assert not res.agrees and res.max_deviation >= 0.8, res.table()
