"""Depth: residual MLPs with depth-muP (``nets.ResMLP``, the depth exponents of ``param.Parameterization``).

Oracles only. The residual net of depth H, written out from its raw weights in tests/oracles.py (m_l: the
width multiplier, a = d^-alpha the branch multiplier, d = (H - 2) / (H_0 - 2)):

    h_1 = m_1 W_1 x + b_1,   h_l = h_{l-1} + a (m_l W_l phi(h_{l-1}) + b_l),   f = m_H W_H phi(h_{H-1}) + b_H

* BP gradients equal autograd of the batch-mean loss of that forward pass;
* PC: every inference move and the weight gradients equal the documented rule written with autograd of
  the residual energy E(v; W) = sum_{l<H} gamma_l / 2 ||v_l - mu_l(v_{l-1})||^2 + gamma_H loss(f(v_{H-1}))
  (mu_l = v_{l-1} + a (m_l W_l phi(v_{l-1}) + b_l) for a block);
* at H = H_0 every preset resolves to its depth-free numbers; at H != H_0 to the documented ones;
* a depth coordinate check: under depth-muP the feature updates after a few SGD steps are flat in depth,
  under the depth-free parameterization (a = 1) they grow (the negative control).

Tolerance: float64 compositions of O(H T) products of size <= 12 on O(1) numbers: 1e-10 relative leaves
five orders of margin over rounding, and any equation error (O(1) relative) fails it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mulocal.algos import make_algo
from mulocal.nets import MLP, ResMLP, build
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import OPTIMIZERS, PRESETS, Parameterization, preset
from oracles import RTOL, close
from oracles import WrittenResNet as Written


def _net(depth=6, act="tanh", gbar=0.0, alpha=0.5, base_depth=3, K=2, optimizer="sgd"):
    """A float64 residual net away from its base width and depth, multipliers != 1, non-zero biases."""
    p = preset("mup", optimizer, gamma_bar_L=gbar, base_width=4).with_(a=(0.0, 0.25, 0.5), base_depth=base_depth,
                                                                         depth_alpha=alpha)
    net = build("resmlp", (7,), 5, 12, p, depth=depth, activation=act, K=K, seeds=[3 + k for k in range(K)],
                dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(K, 6, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=gen)
    return net, x, y


# ----------------------------------------------------------------------------- (a) BP
@pytest.mark.parametrize("act,alpha,loss", [("tanh", 0.5, "ce"), ("relu", 1.0, "mse"), ("tanh", 0.0, "mse")])
def test_bp_grads_equal_autograd_of_written_resnet(act, alpha, loss):
    net, x, y = _net(depth=6, act=act, alpha=alpha)
    ref = Written(net, alpha, 3, loss)
    us, _ = net.forward(x)
    h = ref.forward(x)
    for l in range(1, net.depth + 1):  # the forward pass (the residual stream) itself
        ok, err = close(us[l], h[l])
        assert ok, (l, err)
    grads, batch_loss = make_algo("bp", loss=loss).step(net, x, y)
    W, b, leaves = ref.leaves()
    total = ref.loss_sum(ref.forward(x, W, b)[-1], y) / x.shape[1]  # batch mean per replica, summed over K
    expect = torch.autograd.grad(total, leaves)
    assert len(grads) == len(expect)
    for i, (g, e) in enumerate(zip(grads, expect)):
        ok, err = close(g, e)
        assert ok, (i, err)
    assert torch.allclose(batch_loss.sum(), total.detach(), rtol=1e-12)


# ----------------------------------------------------------------------------- (b) PC
def _bound_kappas(ref, gam, loss):
    """The documented parallel step below a residual layer: 1/(gamma_l + gamma_{l+1} c (1 + s_{l+1})^2),
    s = ||a m W||_2 (exact SVD); below the output 1/(gamma_l + gamma_H c_loss s_H^2)."""
    out = []
    for l in range(1, ref.H):
        above = l + 1
        op = ref.m[above - 1] * ref.W[above - 1] * (ref.a if above < ref.H else 1.0)
        s = torch.linalg.matrix_norm(op, ord=2)
        if above < ref.H:
            out.append(1.0 / (gam[l - 1] + gam[l] * (1 + s) ** 2))
        else:
            out.append(1.0 / (gam[l - 1] + gam[l] * {"mse": 1.0, "ce": 0.5}[loss] * s ** 2))
    return out


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("mode,loss,gbar,gammas", [
    ("sequential", "ce", 0.0, None),
    ("sequential", "mse", -1.0, [1.0, 0.7, 1.3, 0.9, 1.1]),
    ("parallel", "ce", -1.0, None),
    ("parallel", "mse", 0.0, [1.0, 0.7, 1.3, 0.9, 1.1]),
])
def test_pc_inference_and_grads_equal_autograd_of_residual_energy(T, mode, loss, gbar, gammas):
    net, x, y = _net(depth=6, gbar=gbar)
    pc = make_algo("pc", loss=loss, T=T, inference=mode, gammas=gammas, no_status=True)
    gam = pc.energy_weights(net)
    if gbar:
        assert gam[-1] == pytest.approx(3.0)  # gamma_L = m^-gbar_L, m = 12 / 4
    ref = Written(net, 0.5, 3, loss, gam)
    if mode == "sequential":  # documented: 1/(gamma_l + gamma_{l+1}) below a block, 1/gamma_l below the output
        kappas = [1.0 / (gam[l - 1] + gam[l]) if l + 1 < net.depth else 1.0 / gam[l - 1] for l in range(1, net.depth)]
    else:
        kappas = _bound_kappas(ref, gam, loss)
    grads, _ = pc.step(net, x, y)
    v_pc = pc._last[0]
    v0 = ref.forward(x)[:-1]  # F-ini: v_l = h_l
    v_ref = ref.infer(v0, y, T, mode, kappas)
    tol = RTOL if mode == "sequential" else 1e-8  # the parallel step reads ||W||_2 from 100 power iterations
    for l in range(1, net.depth):
        ok, err = close(v_pc[l], v_ref[l], tol)
        assert ok, (l, err)
    W, b, leaves = ref.leaves()
    v_fix = [t.detach() for t in v_pc]
    expect = [g / x.shape[1] for g in torch.autograd.grad(ref.E(v_fix, y, W, b), leaves)]
    top = max(float(e.abs().max()) for e in expect)  # parallel T = 1 leaves the lower errors at exactly 0
    for i, (g, e) in enumerate(zip(grads, expect)):
        ok, err = close(g, e, scale=top)
        assert ok, (i, err)


def test_pc_single_shot_si_equals_gamma_L_times_bp_on_resnet():
    """F-ini + FPA + SI + T = 1 + kappa_l = 1/gamma_l: the PC update is gamma_L times the BP gradient (the residual
    bracket e_{l+1} + J^T B^T e_{l+1} is BP's delta recursion)."""
    net, x, y = _net(depth=7, gbar=-1.0)
    pc_grads, _ = make_algo("pc", T=1, fpa=True, no_status=True).step(net, x, y)
    bp_grads, _ = make_algo("bp").step(net, x, y)
    gL = net.param.gamma_L(net.width)
    for i, (g, e) in enumerate(zip(pc_grads, bp_grads)):
        ok, err = close(g, gL * e)
        assert ok, (i, err)


# ----------------------------------------------------------------------------- (c) H = H_0
def _all_presets():
    out = []
    for name in sorted(PRESETS):
        for opt in OPTIMIZERS:
            for algo in ("bp", "pc", "dtp"):
                out.append(preset(name, opt, algo=algo))
    return out


@pytest.mark.parametrize("width", [32, 64, 128])
def test_every_preset_is_depth_free_at_base_depth(width):
    for p in _all_presets():
        H0 = p.base_depth
        free = p.depth_free()
        for role, fan_in in (("input", 7), ("hidden", width), ("output", width)):
            assert p.rule(role, fan_in, width) == free.rule(role, fan_in, width)  # plain layers never see depth
        assert p.rule("hidden", width, width, depth=H0, residual=True) == p.rule("hidden", width, width)
        assert free.rule("hidden", width, width, depth=H0, residual=True) == p.rule("hidden", width, width)
        a = build("resmlp", (7,), 5, width, p, depth=H0, K=2, dtype=torch.float64)
        b = build("resmlp", (7,), 5, width, free, depth=H0, K=2, dtype=torch.float64)
        for la, lb in zip(a.layers, b.layers):
            assert la.rule == lb.rule and la.mult == lb.mult
            assert torch.equal(la.weight, lb.weight)
        x = torch.randn(3, 7, dtype=torch.float64)
        assert torch.equal(a(x), b(x))
        assert not {"base_depth", "depth_alpha", "depth_c"} & set(p.to_dict())  # records and hashes unchanged


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_depth_rule_documented_values(optimizer, alpha):
    """a_l = d^-alpha; branch LR d^-(1 - 2 alpha) (SGD) or d^-(1 - alpha) (Adam), d = (H - 2)/(H_0 - 2), on top
    of the width rule; input and output layers carry no depth factor; a plain MLP ignores depth."""
    p = preset("mup", optimizer).with_(depth_alpha=alpha, base_depth=4)
    width, H = 128, 18
    d = (H - 2) / (4 - 2)
    c_H = (1 - 2 * alpha) if optimizer == "sgd" else (1 - alpha)
    assert p.depth_lr_exponent() == c_H
    plain = p.rule("hidden", width, width)
    r = p.rule("hidden", width, width, depth=H, residual=True)
    assert r.branch == pytest.approx(d ** -alpha, rel=1e-14)
    assert r.lr_scale == pytest.approx(plain.lr_scale * d ** -c_H, rel=1e-14)
    assert r.bias_lr_scale == pytest.approx(plain.bias_lr_scale * d ** -c_H, rel=1e-14)
    assert (r.init_std, r.multiplier) == (plain.init_std, plain.multiplier)
    net = build("resmlp", (7,), 5, width, p, depth=H)
    assert isinstance(net, ResMLP) and net.depth == H
    assert [l.rule.branch for l in net.layers] == [1.0] + [r.branch] * (H - 2) + [1.0]
    assert net.layers[1].mult == pytest.approx(plain.multiplier * d ** -alpha, rel=1e-14)
    for l, layer in zip((0, H - 1), (net.layers[0], net.layers[-1])):
        assert layer.rule == p.rule(layer.role, layer.fan_in, width)
    assert p.with_(depth_c=0.25).depth_lr_exponent() == 0.25
    mlp = build("mlp", (7,), 5, width, p, depth=H)
    assert isinstance(mlp, MLP) and all(l.rule.branch == 1.0 for l in mlp.layers)
    assert all(l.rule == p.depth_free().rule(l.role, l.fan_in, width) for l in mlp.layers)


# ----------------------------------------------------------------------------- (d) coordinate check in depth
DEPTHS = (4, 8, 16)


def _feature_updates(p: Parameterization, depth: int, algo: str = "bp", lr: float = 0.5, steps: int = 3,
                     width: int = 64, K: int = 4, B: int = 64) -> tuple[float, float]:
    """RMS of h_l(t) - h_l(0) after ``steps`` SGD steps on one batch, for the last block (l = H - 1), the middle
    one (l = H / 2) and the input layer's (l = 1: under the old PC default it did not move), averaged over K replicas."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (B,), generator=gen)
    net = build("resmlp", (16,), 10, width, p, depth=depth, K=K, seeds=range(K), dtype=torch.float64)
    # PC: single-shot SI under FPA, the setting whose update is gamma_L times BP's (see the identity test above)
    # "pc auto": PC at its defaults on a residual net (the error solver on the depth-scaled energy)
    rule = (make_algo(algo) if algo == "bp" else make_algo("pc", no_status=True) if algo == "pc auto"
            else make_algo("pc", T=1, fpa=True, no_status=True))
    opt = LayerwiseOptimizer.for_net(net, lr, "sgd")
    h0 = net.forward(x)[0]
    for _ in range(steps):
        opt.step(rule.step(net, x, y)[0])
    h1 = net.forward(x)[0]

    def rms(l):
        return float((h1[l] - h0[l]).flatten(1).pow(2).mean(1).sqrt().mean())

    return rms(depth - 1), rms(depth // 2), rms(1)


def _slopes(p, algo="bp"):
    """Log-log slopes of the feature updates against depth (per doubling of depth): (last block, middle)."""
    rows = np.array([_feature_updates(p, H, algo) for H in DEPTHS])
    return tuple(float(np.polyfit(np.log2(DEPTHS), np.log2(rows[:, i]), 1)[0]) for i in range(rows.shape[1]))


@pytest.mark.parametrize("algo", ["bp", "pc", "pc auto"])
def test_depth_coord_check_flat_under_depth_mup_and_grows_without(algo):
    """Depth-muP (alpha = 1/2, SGD: depth-independent branch LR) keeps every block's feature update flat in
    depth (|slope| <= 0.15 per doubling over H = 4, 8, 16); the depth-free control (a = 1) grows (slope > 1).
    Measured (width 64, lr 0.5, 3 steps): depth-muP 0.07 (last block), 0.06 (middle); control 1.52, 1.49.
    PC runs single-shot SI under FPA, and at its defaults on a residual net ("pc auto": the error solver, T = 3,
    hidden energy weights d): every block moves, and the input layer (state-based SI without FPA and with gamma_l = 1
    did not reach the deep blocks: slopes -1.32 / -4.38 at T = 1; docs/depth.md). The control also drops PC's
    depth factor of the energy (``depth_free``)."""
    mup = preset("mup", "sgd")
    assert mup.depth_alpha == 0.5 and mup.depth_lr_exponent() == 0.0
    flat = _slopes(mup, algo)
    assert all(abs(s) <= 0.15 for s in flat), flat
    control = _slopes(mup.depth_free(), algo)
    assert all(s > 1.0 for s in control[:2]), control  # the blocks' (the input layer is no block)


def test_depth_coord_check_completep():
    """CompleteP (alpha = 1) with SGD needs the branch LR ~ d (c_H = -1) to stay flat; without it the feature
    updates of the blocks vanish with depth."""
    p = preset("mup", "sgd").with_(depth_alpha=1.0)
    assert p.depth_lr_exponent() == -1.0
    flat = _slopes(p)
    assert all(abs(s) <= 0.15 for s in flat), flat
    shrink = _slopes(p.with_(depth_c=0.0))
    assert all(s < -0.15 for s in shrink[:2]), shrink  # the blocks' (the input layer is no block)
