"""PC's inference solvers (``algos/pc/``) against energies written out in the tests, differentiated by autograd.

Oracles, none of which calls ``algos/pc`` to make an expected value:
* the error solver's moves: the energy as a function of the errors, E(e) = F(s(e)) with the states from the
  forward map s_l = mu_l(s_{l-1}) + e_l written from the raw weights (``Energy`` of test_oracle_pc for plain nets,
  ``oracles.WrittenResNet`` for residual ones), its gradient by autograd, and the documented step
  e_l <- e_l - kappa_l dE/de_l (kappa_l = 1/gamma_l by default); then grad W = autograd of F at the final states;
* equilibrium: the minimiser of the written energy in the values found by L-BFGS (torch.optim, strong Wolfe) to a
  gradient of 1e-13; at it every solver run long enough gives the same weight gradients (1e-8 relative);
* the depth rule of the hidden energy weights (gamma_l = d^depth_gamma), written from the formula;
* muPC's step: jpc's SGD on its batch-mean energy sum ||e||^2 / B (no 1/2) is kappa = 2 beta / B in our per-sample
  units: T = H parallel steps of that size on the written energy.

Tolerance: float64 compositions of O(L T) small matrix products (~1e-15 relative each): 1e-10 (oracles.RTOL)
for the moves; 1e-8 at equilibrium, where both sides stop at a residual of ~1e-12.
"""
from __future__ import annotations

import pytest
import torch

from mulocal.algos import make_algo
from mulocal.errors import ConfigError
from mulocal.nets import build
from mulocal.param import preset
from oracles import WrittenResNet, close
from test_oracle_pc import Energy


def _net(arch, depth, K=2, width=8, seeds=(0, 1), gbar=0.0):
    shape = (1, 8, 8) if arch in ("cnn", "rescnn") else (12,)
    param = preset("mup", "sgd", gamma_bar_L=gbar, base_width=4)
    net = build(arch, shape, 5, width, param, depth=depth, K=K, seeds=list(seeds)[:K], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    return net, x, y


class Written:
    """One face for the plain and the residual written energies."""

    # mu_l, F(v) (summed over batch and replicas) and grad W of F, from an energy written in the tests

    def __init__(self, net, loss, gam):
        self.L, self.gam = net.depth, gam
        if net.residual_net:
            self.ref = WrittenResNet(net, loss=loss, gammas=gam)
            self.mu = self.ref.layer
        else:
            self.ref = Energy(net, loss, gam, raw=net.kind == "mlp")
            self.mu = self.ref.mu

    def F(self, v, y):
        if isinstance(self.ref, Energy):
            return self.ref.F(v, y)
        return self.ref.E(v, y)

    def weight_grads(self, v, y, B):
        v = [t.detach() for t in v]
        if isinstance(self.ref, Energy):
            return self.ref.weight_grads(v, y, B)
        W, b, leaves = self.ref.leaves()
        return [g / B for g in torch.autograd.grad(self.ref.E(v, y, W, b), leaves)]

    def states(self, x0, e):
        s = [x0]
        for l in range(1, self.L):
            s.append(self.mu(l, s[-1]) + e[l - 1])
        return s


def _raw(net, x):
    """The raw input per replica (K, B, ...): the written energies apply the input layer's own pooling."""
    return x.unsqueeze(0).expand(net.K, *x.shape)


def _gammas(net):
    """The documented energy weights: hidden d^1 on a residual net (d = H - 2 at base depth 3), else 1; gamma_L =
    m^-gbar_L (base width 4)."""
    d = net.depth - 2
    hidden = float(d) if net.residual_net else 1.0
    return [hidden] * (net.depth - 1) + [(net.width / 4) ** (-net.param.gamma_bar_L)]


ARCHS = [("mlp", 4), ("resmlp", 5), ("cnn", 3), ("rescnn", 4)]


@pytest.mark.parametrize("arch,depth", ARCHS)
@pytest.mark.parametrize("T,kappa", [(1, None), (3, None), (2, 0.07)])
def test_error_solver_is_the_documented_step_on_the_written_energy_of_the_errors(arch, depth, T, kappa):
    """e_l <- e_l - kappa_l dE/de_l with E(e) = F(s(e)) by autograd, from e = 0; then grad W at the final states.
    A dropped gamma, a stale state in the backward recursion or an error missing from the forward map fails it."""
    net, x, y = _net(arch, depth)
    algo = make_algo("pc", inference="error", T=T, kappa=kappa, guard=False, no_status=True)
    gam = algo.energy_weights(net)
    assert gam == pytest.approx(_gammas(net), rel=1e-15)
    grads, _ = algo.step(net, x, y)
    ref = Written(net, "ce", gam)
    x0 = _raw(net, x)
    ff = ref.states(x0, [0.0] * (net.depth - 1))
    e = [torch.zeros_like(t) for t in ff[1:]]
    kap = [1.0 / g for g in gam[:-1]] if kappa is None else [kappa] * (net.depth - 1)
    for _ in range(T):
        ee = [t.clone().requires_grad_() for t in e]
        grad = torch.autograd.grad(ref.F(ref.states(x0, ee), y), ee)
        e = [t - k * g for t, k, g in zip(e, kap, grad)]
    s = ref.states(x0, e)
    for l in range(1, net.depth):
        ok, err = close(algo._last[0][l], s[l])
        assert ok, (l, err)
    for i, (g, w) in enumerate(zip(grads, ref.weight_grads(s, y, x.shape[0]))):
        ok, err = close(g, w)
        assert ok, (i, err)


def _equilibrium(ref, x0, ff, y):
    """argmin_v F(v) from F-ini on the written energy (float64): Newton steps with the full Hessian of a tiny net
    (torch.func), halved while F does not decrease, until |dF/dv| < 1e-13."""
    shapes = [t.shape for t in ff[1:]]
    sizes = [t.numel() for t in ff[1:]]

    def unflat(flat):
        return [x0] + [p.view(sh) for p, sh in zip(flat.split(sizes), shapes)]

    def energy(flat):
        return ref.F(unflat(flat), y)
    grad, hess = torch.func.grad(energy), torch.func.hessian(energy)
    z = torch.cat([t.detach().flatten() for t in ff[1:]])
    for _ in range(40):
        g = grad(z)
        if float(g.abs().max()) < 1e-13:
            return unflat(z)
        step, F0 = torch.linalg.solve(hess(z), g), energy(z)
        while float(energy(z - step)) > float(F0) and float(step.abs().max()) > 1e-14:
            step = step / 2
        z = z - step
    raise AssertionError("the oracle did not converge")


# the guard stalls where F's changes reach rounding; the state solvers diffuse: thousands of steps
SOLVERS = [pytest.param(dict(inference="error", T=200, guard=False), id="error"),
           pytest.param(dict(inference="sequential", T=3000, no_status=True), id="sequential", marks=pytest.mark.slow),
           pytest.param(dict(inference="parallel", T=6000, no_status=True), id="parallel", marks=pytest.mark.slow),
           pytest.param(dict(inference="mupc", T=20000, activity_lr=0.2, no_status=True), id="mupc",
                        marks=pytest.mark.slow)]


@pytest.mark.parametrize("kw", SOLVERS)
@pytest.mark.parametrize("arch,depth", [("mlp", 4), ("resmlp", 6)])
def test_every_solver_reaches_the_written_energys_minimiser(arch, depth, kw):
    """At equilibrium the weight gradients are the energy's at its minimiser, whichever solver found it (the
    fused parallel path on the MLP, the general one on residual nets). Each solver also reports a relative
    residual below 1e-9 there."""
    net, x, y = _net(arch, depth, width=16)  # m = 4: C ~ gamma_L / M small enough for the full error step
    x, y = x[:3], y[:3]
    algo = make_algo("pc", **kw)
    gam = algo.energy_weights(net)  # the energy this solver minimises (mupc: muPC's unit weights)
    assert gam == pytest.approx(_gammas(net) if kw["inference"] != "mupc" else [1.0] * (net.depth - 1) + [1.0])
    ref = Written(net, "ce", gam)
    x0 = _raw(net, x)
    ff = ref.states(x0, [0.0] * (net.depth - 1))
    v_star = _equilibrium(ref, x0, ff, y)
    expect = ref.weight_grads(v_star, y, x.shape[0])
    grads, _ = algo.step(net, x, y)
    if not kw.get("no_status"):
        res = algo.inference_status()["residual"]
        assert max(res) < 1e-9, res
    for i, (g, w) in enumerate(zip(grads, expect)):
        ok, err = close(g, w, rtol=1e-8)
        assert ok, (i, err)


def test_error_solver_reports_energy_descent_and_a_falling_residual_at_depth():
    """On a 32-layer residual net (width 32, the default energy weights) the default error solver lowers the
    energy at every step (the status' energy_rose is 0) and its relative residual falls with T; with the
    depth-free energy (gamma_l = 1) the full step overshoots (C grows with depth): the status says so without the
    guard, and the default guard backtracks there."""
    net, x, y = _net("resmlp", 32, width=32)
    res = []
    for T in (1, 3, 6):
        algo = make_algo("pc", inference="error", T=T)
        algo.step(net, x, y)
        st = algo.inference_status()
        assert st["energy_rose"] == [0.0, 0.0]
        res.append(max(st["residual"]))
    assert res[0] > res[1] > res[2], res
    flat = build("resmlp", (12,), 5, 32, preset("mup", "sgd", base_width=4, depth_gamma=0.0), depth=32, K=2,
                 dtype=torch.float64)
    algo = make_algo("pc", inference="error", T=6, guard=False)
    algo.step(flat, x, y)
    assert max(algo.inference_status()["energy_rose"]) > 0
    algo = make_algo("pc", inference="error", T=6)  # the default guard puts those steps back
    algo.step(flat, x, y)
    st = algo.inference_status()
    assert st["energy_rose"] == [0.0, 0.0] and min(st["backtracks"]) > 0


def test_error_solver_guard_halves_the_step_where_the_energy_rose():
    """With a step far too large (kappa = 4/gamma) the guard puts replicas back and halves their step; its moves
    are those of the written rule, replica by replica: e' = e - c kappa dE/de, kept iff E(e') <= E(e), else c <- c/2
    and e stays. The recorded energies never rise and the status counts the backtracks."""
    net, x, y = _net("resmlp", 6)
    gam = make_algo("pc").energy_weights(net)
    kap = [4.0 / g for g in gam[:-1]]
    T = 6
    algo = make_algo("pc", inference="error", T=T, kappa=kap, guard=True, record=True)
    algo.step(net, x, y)
    E = algo.stats["energy"]
    assert (E[1:] <= E[:-1] * (1 + 1e-12)).all()
    assert min(algo.inference_status()["backtracks"]) > 0
    for k in range(net.K):
        ref = Written(_one(net, k), "ce", gam)
        x0 = _raw(net, x)[k:k + 1]
        e = [torch.zeros_like(t) for t in ref.states(x0, [0.0] * (net.depth - 1))[1:]]
        c, F = 1.0, float(ref.F(ref.states(x0, e), y))
        for _ in range(T):
            ee = [t.clone().requires_grad_() for t in e]
            g = torch.autograd.grad(ref.F(ref.states(x0, ee), y), ee)
            cand = [t - c * kk * gi for t, kk, gi in zip(e, kap, g)]
            F_new = float(ref.F(ref.states(x0, cand), y))
            if F_new <= F:
                e, F = cand, F_new
            else:
                c /= 2
        assert float(algo.stats["step_scale"][k]) == c
        s = ref.states(x0, e)
        for l in range(1, net.depth):
            ok, err = close(algo._last[0][l][k:k + 1], s[l])
            assert ok, (k, l, err)


def _one(net, k):
    """Replica k of ``net`` alone (the same weights), for per-replica written energies."""
    one = build(net.kind, net.input_shape, net.out_dim, net.width, net.param, depth=net.depth, K=1, seeds=[0],
                dtype=torch.float64)
    for a, b in zip(one.params(), net.params()):
        a.copy_(b[k:k + 1])
    return one


def test_error_solver_replicas_equal_separate_runs():
    """Replica k of a batched step = the same seed alone (float64; the batched and lone runs use kernels of
    different shapes, so equal to rounding: 1e-12 relative)."""
    net, x, y = _net("resmlp", 6, K=2, seeds=(3, 5))
    both, _ = make_algo("pc", inference="error", T=3).step(net, x, y)
    for k, seed in enumerate((3, 5)):
        one, x1, y1 = _net("resmlp", 6, K=1, seeds=(seed,))
        alone, _ = make_algo("pc", inference="error", T=3).step(one, x, y)
        for g, a in zip(both, alone):
            ok, err = close(g[k:k + 1], a, rtol=1e-12)
            assert ok, (k, err)


def test_auto_picks_the_error_solver_on_residual_nets_only():
    """inference=auto: error (T = 3) on a residual net, sequential single shot on a plain one, and sequential
    where an option of state-based inference is given; the cell records what auto resolved to."""
    from mulocal.config import default_cell, resolved_algo
    for arch, depth, kw, mode, T in (("resmlp", 6, {}, "error", 3), ("mlp", 4, {}, "sequential", 1),
                                     ("resmlp", 6, {"fpa": True}, "sequential", 1),
                                     ("resmlp", 6, {"inference": "mupc"}, "mupc", 6)):  # mupc: unit weights
        net, x, y = _net(arch, depth)
        algo = make_algo("pc", **kw)
        algo.step(net, x, y)
        assert (algo.mode, algo.steps) == (mode, T), (arch, kw)
        rec = resolved_algo(default_cell(algo="pc", arch=arch, depth=depth, algo_options=kw))
        assert (rec["inference"], rec["T"]) == (mode, T)
        assert rec["gammas"] == ("d^1" if arch == "resmlp" and mode != "mupc" else None)


def test_mupc_is_jpcs_activity_sgd_on_the_batch_mean_energy():
    """muPC's recipe: T = H parallel steps v <- v - beta dF_jpc/dv with F_jpc = sum_l ||e_l||^2 / B (jpc's energy,
    no 1/2), i.e. kappa = 2 beta / B on our per-sample energy, written here with autograd (MSE, gamma 1 on the
    written energy's scale: the net's own gammas)."""
    net, x, y = _net("resmlp", 5)
    beta = 0.3
    algo = make_algo("pc", loss="mse", inference="mupc", activity_lr=beta, no_status=True)
    grads, _ = algo.step(net, x, y)
    gam = algo.energy_weights(net)
    ref = Written(net, "mse", gam)
    x0 = _raw(net, x)
    v = ref.states(x0, [0.0] * (net.depth - 1))
    for _ in range(net.depth):
        vv = [t.detach().clone().requires_grad_() for t in v[1:]]
        jpc = ref.F([x0] + vv, y) * (2.0 / x.shape[0])  # jpc's energy: twice ours, over the batch
        g = torch.autograd.grad(jpc, vv)
        v = [x0] + [t - beta * gi for t, gi in zip(v[1:], g)]
    for l in range(1, net.depth):
        ok, err = close(algo._last[0][l], v[l])
        assert ok, (l, err)
    assert gam[:-1] == [1.0] * (net.depth - 1)  # muPC's energy: unit weights, not the depth rule
    cnn, xc, yc = _net("rescnn", 4)  # the batch is read behind the image dimensions too
    algo = make_algo("pc", inference="mupc", activity_lr=beta, no_status=True)
    algo.step(cnn, xc, yc)
    assert algo.kappa == 2 * beta / xc.shape[0] and algo.steps == 4


def test_error_solver_refuses_state_based_options_in_one_line():
    for kw in (dict(fpa=True), dict(init="zero"), dict(momentum=0.5), dict(tol=1e-3), dict(incremental=True)):
        with pytest.raises(ConfigError, match="error solver"):
            make_algo("pc", inference="error", **kw)
    with pytest.raises(ConfigError, match="activity_lr"):
        make_algo("pc", inference="mupc", kappa=0.1)


def test_report_flags_cells_whose_inference_did_not_converge():
    """Hand-made cells: a final relative residual above RESIDUAL_CONVERGED (0.1) counts as not converged, at or
    below it as converged; the summary line says so, and a family with no such cell has no flag."""
    from mulocal.algos.pc import RESIDUAL_CONVERGED
    from mulocal.sweep.table import _inference_line
    from mulocal.sweep.transfer import inference_summary

    def cell(res, lr):
        return {"status": "done", "lr": lr, "history": [{"epoch": 1, "pc_energy_rose": 0.0, "pc_residual": res}]}
    inf = inference_summary([cell(0.5, 0.1), cell(RESIDUAL_CONVERGED, 0.2), cell(0.01, 0.4)])
    assert inf["unconverged_cells"] == 1 and inf["cells"] == 3
    assert "NOT CONVERGED in 1 cells" in _inference_line("pc", inf)
    ok = inference_summary([cell(0.01, 0.1)])
    assert ok["unconverged_cells"] == 0 and "NOT CONVERGED" not in _inference_line("pc", ok)
