"""Closed forms: deep linear PC at its inference equilibrium equals Theorem 4.2 (PAPER section 4)."""
import pytest
import torch
import torch.nn.functional as F

from mulocal.algos.pc import PC
from mulocal.diagnostics.linear import pc_fixed_point, preconditioner
from mulocal.nets import build
from mulocal.param import preset


def _setup(gbar, width=16, seed=3):
    torch.manual_seed(seed)
    net = build("mlp", (6,), 4, width, preset("mup", "sgd", gamma_bar_L=gbar, base_width=4), activation="linear",
                bias=False, seeds=[seed], dtype=torch.float64)
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 4, (9,))
    return net, x, y


@pytest.mark.parametrize("gbar", [-1.0, 0.0, 1.0])
@pytest.mark.parametrize("hidden_gammas", [(1.0, 1.0), (1.0, 2.5), (0.5, 3.0)])
def test_parallel_inference_converges_to_closed_form(gbar, hidden_gammas):
    net, x, y = _setup(gbar)
    algo = PC(loss="mse", T=2500, inference="parallel", kappa=0.12, gammas=hidden_gammas)
    grads, _ = algo.step(net, x, y)
    gam = algo.energy_weights(net)
    Ws = [layer.weight[0] * layer.mult for layer in net.layers]
    cf = pc_fixed_point(Ws, x, F.one_hot(y, 4).double(), gam)
    v, _ = algo._last
    # errors at the equilibrium: e_l = v_l - W_l v_{l-1}, e_L = y - W_L v_{L-1}
    vals = [t[0] for t in v]
    errs = [vals[l] - vals[l - 1] @ Ws[l - 1].T for l in range(1, 3)]
    errs.append(F.one_hot(y, 4).double() - vals[2] @ Ws[2].T)
    for e, e_star in zip(errs, cf["errors"]):
        assert torch.allclose(e, e_star, rtol=0, atol=1e-8 * e_star.abs().max())
    for g, g_star in zip(grads, cf["grads"]):
        assert torch.allclose(g[0], g_star, rtol=0, atol=1e-8 * g_star.abs().max())


def test_closed_form_is_not_the_gradient_when_C_is_large():
    """Guard: with gbar = -1 at large width, C is O(1) and the closed form differs from plain GD
    (so the test above compares against something that is not just BP)."""
    net, x, y = _setup(-1.0, width=64)
    gam = PC(loss="mse").energy_weights(net)
    Ws = [layer.weight[0] * layer.mult for layer in net.layers]
    C = preconditioner(Ws, gam)
    assert torch.linalg.matrix_norm(C, 2) > 0.1
    net0, _, _ = _setup(1.0, width=64)
    C0 = preconditioner([layer.weight[0] * layer.mult for layer in net0.layers], PC(loss="mse").energy_weights(net0))
    assert torch.linalg.matrix_norm(C0, 2) < 0.05 * torch.linalg.matrix_norm(C, 2)


@pytest.mark.parametrize("inference", ["parallel", "sequential"])
def test_energy_decreases_monotonically(inference):
    net = build("mlp", (10,), 5, 32, preset("mup", "sgd", base_width=8), activation="tanh", seeds=[0],
                dtype=torch.float64)
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 5, (16,))
    algo = PC(T=60, inference=inference, kappa=0.05, record=True, init="random", seed=1)
    algo.step(net, x, y)
    E = algo.stats["energy"].sum(1)[:, 0]
    assert E[-1] < 0.5 * E[0]
    assert bool((E[1:] <= E[:-1] + 1e-12).all()), E


# ----------------------------------------------------------------------------- cosines with BP (Fig. 3)
def test_linear_pc_cosine_with_bp_vs_width(fmnist):
    """Deep linear PC at equilibrium: with gbar_L = 0 the update tends to BP's (cosine increasing,
    > 0.99 on every layer at M = 2048); with gbar_L = -1 the output-side layer stays below 0.995."""
    from mulocal.diagnostics.align import cosine_vs_width
    x, y = fmnist.x_train[:32].double().flatten(1), fmnist.y_train[:32]
    widths = [64, 256, 1024, 2048]
    sgd = cosine_vs_width(widths, x, y, activation="linear", gamma_bar_L=0.0, seeds=(0, 1),
                          modes=("pc-equilibrium",))["modes"]["pc-equilibrium"]["cos_bp"]
    for layer in range(3):
        col = [row[layer] for row in sgd]
        assert all(b >= a - 1e-4 for a, b in zip(col, col[1:])), col
        assert col[-1] > 0.99, col
    gn = cosine_vs_width(widths, x, y, activation="linear", gamma_bar_L=-1.0, seeds=(0, 1),
                         modes=("pc-equilibrium",))["modes"]["pc-equilibrium"]["cos_bp"]
    assert gn[-1][2] < 0.995, gn[-1]
    assert gn[-1][2] < sgd[-1][2] - 0.003


def test_preconditioner_norm_scaling():
    """||C|| at init: ~ M^-1 for gbar_L = 0, M^-2 for gbar_L = 1, ~ constant for gbar_L = -1."""
    from mulocal.diagnostics.align import preconditioner_vs_width
    from mulocal.diagnostics.slopes import fit_slope
    widths = [128, 256, 512, 1024]
    res = preconditioner_vs_width(widths, (-1.0, 0.0, 1.0), seeds=(0, 1))
    assert fit_slope(widths, res["norms"]["0.0"]) == pytest.approx(-1.0, abs=0.15)
    assert fit_slope(widths, res["norms"]["1.0"]) == pytest.approx(-2.0, abs=0.15)
    assert abs(fit_slope(widths, res["norms"]["-1.0"])) < 0.25
