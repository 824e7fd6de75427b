"""The optimizers users expect under muP: AdamW (decoupled weight decay), Adam's width-scaled epsilon, independent
weight decay, and heavy-ball momentum on PC's activities (PCX's inference optimizer). Each test is an oracle: the
expected numbers come from torch.optim or from the update rule written out here (param.py's module docstring
states the rules: eps_l = eps m^-e[role], decoupled wd_l = wd m^-w[role], default w = -c).

Tolerance: float64 updates of O(steps) elementwise operations; the two sides round differently (torch's denominator
sqrt(v) / sqrt(1 - b2^t) against ours sqrt(v / (1 - b2^t))), ~1e-16 relative per
operation, so 1e-10 relative (``oracles.RTOL``) leaves orders of margin while a wrong scale (a factor m = 4) fails.
"""
from __future__ import annotations

import pytest
import torch

from mulocal.algos import make_algo
from mulocal.config import default_cell, resolved_param, validate
from mulocal.errors import ConfigError
from mulocal.nets import build
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset
from mulocal.train import TrainConfig
from oracles import RTOL, close

BASE = 16


def _net(width, param, depth=3, K=2, dtype=torch.float64):
    return build("mlp", (6,), 4, width, param, depth=depth, K=K, seeds=list(range(K)), dtype=dtype)


def _grads(net, gen, scale=1.0):
    return [scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in net.params()]


# ----------------------------------------------------------------------------- (a) torch.optim.AdamW at M = M_0
@pytest.mark.parametrize("eps,wd,overrides", [
    (1e-8, 0.1, {}),
    (1e-2, 0.3, {}),  # eps comparable with the gradients: its value matters
    (1e-2, 0.3, dict(eps_exponents=(1, 1, 0), wd_exponents=(0.5, -1, 2))),  # m = 1: every exponent gives 1
])
def test_adamw_at_the_base_width_equals_torch_adamw(eps, wd, overrides):
    """At M = M_0 every scale is 1, so Adam with ``weight_decay_mode="decoupled"`` is torch.optim.AdamW with the
    same lr, betas, eps and weight_decay (p <- p (1 - lr wd), then the Adam step), over several steps."""
    net = _net(BASE, preset("mup", "adam", base_width=BASE, **overrides), K=1)
    ref = [p.detach()[0].clone().requires_grad_() for p in net.params()]
    lr, betas = 0.01, (0.8, 0.95)
    torch_opt = torch.optim.AdamW(ref, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    opt = LayerwiseOptimizer.for_net(net, lr, "adam", betas=betas, eps=eps, weight_decay=wd,
                                     weight_decay_mode="decoupled")
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        grads = _grads(net, gen, scale=1e-2)
        opt.step(grads)
        for r, g in zip(ref, grads):
            r.grad = g[0].clone()
        torch_opt.step()
    for i, (p, r) in enumerate(zip(net.params(), ref)):
        ok, err = close(p[0], r.detach())
        assert ok, f"tensor {i}: rel err {err:.2e}"


# ----------------------------------------------------------------------------- (b) each layer at another width
# muP with Adam: c = (0, 1, 1), c_bias = (0, 0); m = 64 / 16 = 4. Tensors W1, b1, W2, b2, W3, b3.
M = 4.0
LR_SCALE = [1.0, 1.0, M ** -1, 1.0, M ** -1, 1.0]  # m^-c (weights), m^-c_bias (biases)
EPS_110 = [M ** -1, M ** -1, M ** -1, M ** -1, 1.0, 1.0]  # e = (1, 1, 0): input, hidden eps / 4, output eps
WD_INDEPENDENT = [1.0, 1.0, M, 1.0, M, 1.0]  # w = -c: wd m^c (biases: m^c_bias = 1)
WD_EXPLICIT = [M ** -0.5, M ** -0.5, M ** 1, M ** 1, M ** -2, M ** -2]  # w = (0.5, -1, 2), biases like weights


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("wd_exponents,wd_scale", [(None, WD_INDEPENDENT), ((0.5, -1, 2), WD_EXPLICIT)])
def test_each_layers_update_at_another_width_is_the_hand_computation(kind, wd_exponents, wd_scale):
    """At m = 4, tensor i moves by p <- p - lr_i (u_i + wd_i p) with lr_i = lr m^-c, wd_i = wd m^-w (w = -c by
    default) and Adam's u_i = m_hat / (sqrt(v_hat) + eps_i), eps_i = eps m^-e, e = (1, 1, 0); SGD with momentum:
    u_i = buf_i <- mu buf_i + g (the numbers written out above, not read from the code)."""
    net = _net(64, preset("mup", kind, base_width=BASE, eps_exponents=(1, 1, 0), wd_exponents=wd_exponents))
    lr, eps, wd, b1, b2, mom = (0.01, 1e-2, 0.2, 0.9, 0.99, 0.0) if kind == "adam" else (0.05, 1e-8, 0.2, 0, 0, 0.5)
    if kind == "sgd":  # muP with SGD: c = (-1, 0, 1), c_bias = (-1, 0) (input and hidden biases, output bias)
        lr_scale, wd_scale = [M, M, 1.0, M, M ** -1, 1.0], (
            [M ** -1, M ** -1, 1.0, M ** -1, M, 1.0] if wd_exponents is None else wd_scale)
    else:
        lr_scale = LR_SCALE
    expect = [p.detach().clone() for p in net.params()]
    m1 = [torch.zeros_like(p) for p in expect]
    m2 = [torch.zeros_like(p) for p in expect]
    opt = LayerwiseOptimizer.for_net(net, lr, kind, momentum=mom, betas=(b1, b2), eps=eps, weight_decay=wd,
                                     weight_decay_mode="decoupled")
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 5):
        grads = _grads(net, gen, scale=1e-2)
        opt.step(grads)
        for i, g in enumerate(grads):
            lr_i, wd_i = lr * lr_scale[i], wd * wd_scale[i]
            if kind == "adam":
                m1[i] = b1 * m1[i] + (1 - b1) * g
                m2[i] = b2 * m2[i] + (1 - b2) * g * g
                u = (m1[i] / (1 - b1 ** t)) / ((m2[i] / (1 - b2 ** t)).sqrt() + eps * EPS_110[i])
            else:
                m1[i] = mom * m1[i] + g
                u = m1[i]
            expect[i] = expect[i] - lr_i * (u + wd_i * expect[i])
    for i, (p, e) in enumerate(zip(net.params(), expect)):
        ok, err = close(p, e)
        assert ok, f"tensor {i} ({net.param_info()[i]}): rel err {err:.2e}"
    if kind == "adam":  # the moment buffers are Adam's moments of g itself (torch.optim.Adam's state), any eps
        for i in range(len(m1)):
            assert close(opt.bufs[i], m1[i])[0] and close(opt.sq[i], m2[i])[0], f"tensor {i}'s moments"


def test_adam_state_saved_with_moments_of_g_over_s_resumes_the_same_run():
    """A state written by earlier versions (no ``moments_of`` mark: a tensor with eps_l = eps s kept the moments of
    g / s) loads as the moments of g, m s and v s^2, so the resumed run takes the uninterrupted run's steps."""
    net = _net(64, preset("mup", "adam", base_width=BASE, eps_exponents=(1, 1, 0)))
    twin = _net(64, preset("mup", "adam", base_width=BASE, eps_exponents=(1, 1, 0)))
    kw = dict(betas=(0.9, 0.99), eps=1e-2)
    opt = LayerwiseOptimizer.for_net(net, 0.01, "adam", **kw)
    gen = torch.Generator().manual_seed(2)
    m_old = [torch.zeros_like(p) for p in net.params()]  # the earlier versions' buffers, written out: Adam on g / s
    v_old = [torch.zeros_like(p) for p in net.params()]
    for _ in range(3):
        grads = _grads(net, gen, scale=1e-2)
        opt.step(grads)
        for i, (g, s) in enumerate(zip(grads, EPS_110)):
            m_old[i] = 0.9 * m_old[i] + 0.1 * (g / s)
            v_old[i] = 0.99 * v_old[i] + 0.01 * (g / s) ** 2
    old = opt.state_dict()
    del old["moments_of"]
    old["bufs"], old["sq"] = m_old, v_old
    for p, q in zip(twin.params(), net.params()):
        p.copy_(q)
    resumed = LayerwiseOptimizer.for_net(twin, 0.01, "adam", **kw)
    resumed.load_state_dict(old)
    grads = _grads(net, gen, scale=1e-2)
    opt.step(grads)
    resumed.step([g.clone() for g in grads])
    for i, (p, q) in enumerate(zip(twin.params(), net.params())):
        ok, err = close(p, q)
        assert ok, f"tensor {i}: rel err {err:.2e}"


def test_width_scaled_eps_is_the_rule_resolved_per_role():
    """LayerRule.eps_scale = m^-e[role] for weight and bias (e = (1, 1, 0): 1/4, 1/4, 1 at m = 4; the output
    layer's bias: 1), the mup preset with Adam: microsoft/mup's e = (0, 0, -1) (1, 1, 4); SP: 1."""
    net = _net(64, preset("mup", "adam", base_width=BASE, eps_exponents=(1, 1, 0)))
    assert [layer.rule.eps_scale for layer in net.layers] == [0.25, 0.25, 1.0]
    assert [layer.rule.bias_eps_scale for layer in net.layers] == [0.25, 0.25, 1.0]
    mup_adam = _net(64, preset("mup", "adam", base_width=BASE)).layers
    assert [layer.rule.eps_scale for layer in mup_adam] == [1, 1, 4]
    assert [layer.rule.bias_eps_scale for layer in mup_adam] == [1, 1, 1]
    assert [layer.rule.eps_scale for layer in _net(64, preset("sp", "adam", base_width=BASE)).layers] == [1, 1, 1]


# ----------------------------------------------------------------------------- (c) decoupled vs L2
def test_decoupled_differs_from_l2_and_l2_is_unchanged():
    """L2 (the default mode) still equals torch.optim.Adam's weight_decay (wd p added to the gradient, with the
    per-layer LRs, no width scaling: wd_exponents and the independent rule do not touch it); decoupled moves the
    weights differently (by more than 1e-6 relative after 4 steps)."""
    param = preset("mup", "adam", base_width=BASE, eps_exponents=(0, 0, 0))  # torch's Adam: one eps
    lr, wd = 0.01, 0.3
    nets = {mode: _net(64, param) for mode in ("l2", "l2-coupled-w", "decoupled")}
    nets["l2-coupled-w"] = _net(64, param.with_(wd_exponents=(0, 0, 0)))
    opts = {mode: LayerwiseOptimizer.for_net(net, lr, "adam", weight_decay=wd,
                                             weight_decay_mode="decoupled" if mode == "decoupled" else "l2")
            for mode, net in nets.items()}
    ref = [p.detach().clone().requires_grad_() for p in nets["l2"].params()]
    torch_opt = torch.optim.Adam([{"params": [r], "lr": lr * s} for r, s in zip(ref, LR_SCALE)], weight_decay=wd)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        grads = _grads(nets["l2"], gen)
        for mode in nets:
            opts[mode].step(grads)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        torch_opt.step()
    for p, q, r in zip(nets["l2"].params(), nets["l2-coupled-w"].params(), ref):
        assert torch.equal(p, q)
        assert close(p, r.detach())[0]
    diff = max((p - q).abs().max() / q.abs().max() for p, q in zip(nets["decoupled"].params(), nets["l2"].params()))
    assert diff > 1e-6


# ----------------------------------------------------------------------------- (d) independent weight decay
@pytest.mark.parametrize("name,opt,gbar,depth,arch", [
    ("mup", "adam", 0.0, 3, "mlp"), ("mup", "sgd", 0.0, 4, "mlp"), ("mup", "sgd", -1.0, 3, "mlp"),
    ("sp", "adam", 0.0, 3, "mlp"), ("mup", "adam", 0.0, 6, "resmlp"), ("mup", "sgd", 0.0, 6, "resmlp")])
def test_independent_weight_decay_keeps_lr_times_wd_at_every_width(name, opt, gbar, depth, arch):
    """Default ``wd_exponents`` (None, w = -c): the decay per step of every tensor, lr_l wd_l (the optimizer's
    1 - keep factor), equals eta wd at every width, residual blocks (their depth LR factor) included; with
    w = (0, 0, 0) (coupled) it is eta wd m^-c instead."""
    eta, wd = 0.05, 0.1
    for width in (16, 48, 64, 256):
        param = preset(name, opt, gamma_bar_L=gbar, algo="pc" if gbar else "bp", base_width=BASE)
        net = build(arch, (6,), 4, width, param, depth=depth, K=1, seeds=[0], dtype=torch.float64)
        o = LayerwiseOptimizer.for_net(net, eta, opt, weight_decay=wd, weight_decay_mode="decoupled")
        for i, keep in enumerate(o.keep):
            assert float(1 - keep.flatten()[0]) == pytest.approx(eta * wd, rel=1e-12), (width, i)
        net_c = build(arch, (6,), 4, width, param.with_(wd_exponents=(0, 0, 0)), depth=depth, K=1, seeds=[0],
                      dtype=torch.float64)
        c = LayerwiseOptimizer.for_net(net_c, eta, opt, weight_decay=wd, weight_decay_mode="decoupled")
        assert [float(1 - k.flatten()[0]) for k in c.keep] == pytest.approx([eta * s * wd for s in c.scales],
                                                                              rel=1e-12)


# ----------------------------------------------------------------------------- (e) heavy-ball on PC's activities
def _energy(net, x, y, gam):
    """F(v) = sum_{l<L} gamma_l / 2 ||v_l - mu_l(v_{l-1})||^2 + gamma_L CE(mu_L(v_{L-1}), y), summed over the batch,
    mu_l(v) = mult_l W_l phi(v) + b_l (phi = identity on the input), from the raw weights."""
    W = [layer.weight.detach() for layer in net.layers]
    b = [layer.bias.detach() for layer in net.layers]
    mult = [layer.mult for layer in net.layers]
    L = net.depth

    def mu(l, v_prev):
        a = v_prev if l == 1 else torch.tanh(v_prev)
        return mult[l - 1] * torch.einsum("kbi,koi->kbo", a, W[l - 1]) + b[l - 1][:, None, :]

    def F(v):
        tot = sum(0.5 * gam[l - 1] * (v[l] - mu(l, v[l - 1])).pow(2).sum() for l in range(1, L))
        logp = torch.log_softmax(mu(L, v[L - 1]), -1)
        return tot - gam[-1] * logp.gather(-1, y.expand(x.shape[0], -1)[..., None]).sum()

    def dF(v):
        vv = [v[0]] + [t.detach().clone().requires_grad_() for t in v[1:]]
        return [None] + list(torch.autograd.grad(F(vv), vv[1:]))

    ff = [x]
    for l in range(1, L):
        ff.append(mu(l, ff[-1]))
    return dF, ff


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("mu", [0.5, 0.9])
def test_pc_activity_momentum_is_heavy_ball_on_the_energy(mode, mu):
    """PC's ``momentum`` (``--inference-momentum``: PCX's SGD with momentum on the activities) with kappa is the
    heavy ball q_l <- mu q_l + dF/dv_l, v_l <- v_l - kappa q_l from F-ini, dF/dv by autograd on the written-out
    energy (sequential: top-down, each layer at the state as it is then; parallel: one snapshot per step)."""
    param = preset("mup", "sgd", base_width=4)
    net = build("mlp", (7,), 5, 12, param, depth=4, K=2, seeds=[3, 4], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=gen)
    T, kappa = 5, 0.2
    algo = make_algo("pc", T=T, inference=mode, kappa=kappa, momentum=mu)
    algo.step(net, x, y)
    gam = [1.0] * (net.depth - 1) + [param.gamma_L(12)]
    dF, v = _energy(net, x, y, gam)
    q = [None] + [torch.zeros_like(t) for t in v[1:]]
    for _ in range(T):
        if mode == "sequential":
            for l in range(net.depth - 1, 0, -1):
                q[l] = mu * q[l] + dF(v)[l]
                v[l] = v[l] - kappa * q[l]
        else:
            g = dF(v)
            for l in range(1, net.depth):
                q[l] = mu * q[l] + g[l]
                v[l] = v[l] - kappa * q[l]
    v_code = algo._last[0]
    for l in range(1, net.depth):
        ok, err = close(v_code[l], v[l], rtol=RTOL)
        assert ok, f"v_{l}: rel err {err:.2e}"


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_pc_activity_momentum_zero_is_the_plain_solver_bit_for_bit(mode):
    """momentum = 0 takes the solver's plain path: the same weight gradients, bit for bit, as no momentum given."""
    def grads(**kw):
        net = build("mlp", (7,), 5, 12, preset("mup", "sgd", base_width=4), depth=4, K=2, seeds=[3, 4])
        gen = torch.Generator().manual_seed(5)
        x, y = torch.randn(2, 6, 7, generator=gen), torch.randint(0, 5, (6,), generator=gen)
        return make_algo("pc", T=3, inference=mode, kappa=0.2, **kw).step(net, x, y)[0]
    for a, b in zip(grads(), grads(momentum=0.0)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- records and plumbing
def test_new_fields_at_their_defaults_leave_the_records_unchanged():
    """A cell at the defaults records neither the exponents (``param_resolved``) nor the new run fields
    (implicit: left out of sweep cells); set, they are recorded. muP with Adam records its eps rule (mup's e_out =
    -1): its cells mean something new, so their hashes change; SGD's and SP's do not."""
    for opt, param in (("sgd", "mup"), ("adam", "sp"), ("sgd", "sp")):
        rp = resolved_param(default_cell(optimizer=opt, param=param))
        assert "eps_exponents" not in rp and "wd_exponents" not in rp
    assert resolved_param(default_cell(optimizer="adam"))["eps_exponents"] == [0, 0, -1]
    rp = resolved_param(default_cell(optimizer="adam", param_options={"eps_exponents": [1, 1, 0],
                                                                     "wd_exponents": [0, 0, 0]}))
    assert rp["eps_exponents"] == [1, 1, 0] and rp["wd_exponents"] == [0, 0, 0]
    from mulocal.sweep.spec import expand
    base = dict(widths=[64], lrs=[0.01], optimizer="adam")
    cells = expand(base) + expand({**base, "weight_decay_mode": "l2", "adam_eps": 1e-8})
    assert all("weight_decay_mode" not in c and "adam_eps" not in c for c in cells)
    assert expand(base)[0] == expand({**base, "weight_decay_mode": "l2", "adam_eps": 1e-8})[0]
    assert expand({**base, "weight_decay_mode": "decoupled"})[0]["weight_decay_mode"] == "decoupled"


def test_assembled_run_passes_mode_and_eps_to_the_optimizer():
    """A cell's weight_decay_mode, adam_eps and eps_exponents reach the trainer's optimizer (m = 128 / 64 = 2)."""
    from mulocal.config import assemble
    from mulocal.data import load_dataset
    data = load_dataset("synthetic", train_subset=64, test_subset=32)
    cell = default_cell(optimizer="adam", weight_decay=0.1, weight_decay_mode="decoupled", adam_eps=1e-4, width=128,
                        dataset="synthetic", param_options={"eps_exponents": [1, 1, 0]})
    opt = assemble(cell, [1e-3], [0], data=data).trainer().opt
    assert opt.decoupled and opt.eps == 1e-4 and opt.eps_scales == [0.5, 0.5, 0.5, 0.5, 1.0, 1.0]


# ----------------------------------------------------------------------------- (f) bad inputs
@pytest.mark.parametrize("make,match", [
    (lambda: validate(default_cell(weight_decay=-0.1)), "weight decay must be non-negative"),
    (lambda: validate(default_cell(adam_eps=0.0)), "eps must be positive"),
    (lambda: validate(default_cell(adam_eps=-1e-8)), "eps must be positive"),
    (lambda: validate(default_cell(weight_decay_mode="adamw")), "unknown weight decay mode"),
    (lambda: validate(default_cell(optimizer="adamw")), "AdamW is Adam with decoupled weight decay"),
    (lambda: validate(default_cell(momentum=1.0)), r"momentum must be in \[0, 1\)"),
    (lambda: TrainConfig(weight_decay=float("nan")), "weight decay"),
    (lambda: TrainConfig(adam_eps=0), "eps must be positive"),
    (lambda: LayerwiseOptimizer([torch.zeros(1, 2)], [1.0], 0.1, "adam", eps=0.0), "eps must be positive"),
    (lambda: LayerwiseOptimizer([torch.zeros(1, 2)], [1.0], 0.1, "adam", weight_decay=-1.0), "non-negative"),
    (lambda: preset("mup", "adam", eps_exponents=(1, 1)), "eps_exponents must be 3"),
    (lambda: preset("mup", "adam", wd_exponents=(0, "x", 0)), "wd_exponents must be 3"),
    (lambda: preset("mup", "adam", eps_exponents=None), "eps_exponents must be 3"),
    (lambda: make_algo("pc", momentum=1.0), r"inference momentum must be in \[0, 1\)"),
    (lambda: make_algo("pc", momentum=-0.1), r"inference momentum must be in \[0, 1\)"),
])
def test_bad_inputs_give_one_config_error_line(make, match):
    with pytest.raises(ConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_graph_safe_adamw_equals_eager():
    """Graph-safe mode (the step count on the device, for compiled / captured steps) computes the same decoupled
    decay and width-scaled eps as eager mode (up to the rounding of beta^t on the device)."""
    param = preset("mup", "adam", base_width=BASE, eps_exponents=(1, 1, 0))
    nets = [_net(64, param) for _ in range(2)]
    opts = [LayerwiseOptimizer.for_net(n, 0.01, "adam", eps=1e-2, weight_decay=0.2, weight_decay_mode="decoupled")
            for n in nets]
    opts[1].set_graph_safe(True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        grads = _grads(nets[0], gen, scale=1e-2)
        for o in opts:
            o.step(grads)
    for p, q in zip(nets[0].params(), nets[1].params()):
        assert close(q, p)[0]
