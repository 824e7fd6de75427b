"""Scaling laws: coordinate checks are flat under muP and grow under SP."""
import pytest

from mulocal.algos import make_algo
from mulocal.diagnostics.coord import coord_batches, coord_check, fit_slope
from mulocal.nets import build
from mulocal.param import preset

WIDTHS = [64, 128, 256, 512, 1024]


def _coord(data, pname, opt, lr, steps=3):
    p = preset(pname, opt)
    batches, probe = coord_batches(data, steps, 64, seed=0)
    return coord_check(lambda w: build("mlp", data.input_shape, 10, w, p, K=4, seeds=range(4)),
                       make_algo("bp"), WIDTHS, batches, probe, lr, opt)


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
