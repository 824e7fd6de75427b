"""The fused parallel step of PC (``algos/pc/fused.py``, docs/PERFORMANCE.md) equals the general state solver's.

``PC.step`` takes a fused path for parallel inference without FPA, guard, record, tol, momentum or incremental
updates on a plain MLP: the one-hot target built once, in-place moves with the step and gamma_{l+1} folded into
one coefficient, buffers reused, the errors that are exactly 0 at F-ini skipped. The general path is the one the
autograd energy oracle checks (tests/test_oracle_pc.py runs with ``record=True``, which never takes the fused
path). Here both paths run on the same net and batch, and every output must agree to float64 rounding: the
values after inference, the weight gradients, the returned loss and the inference status. If the fused path
dropped a term (the e_l term of dF/dv_l, gamma_{l+1}, the multiplier), moved in place a tensor the next step
still reads, or skipped a recomputation it needs, these comparisons fail while training would still look
plausible.
"""
import pytest
import torch

from mulocal.algos.pc import PC
from mulocal.nets import build
from mulocal.param import preset


def _net(act="tanh", gbar=0.0, depth=4, K=2, bias=True, dtype=torch.float64):
    """A small net away from its base width, with multipliers != 1 and non-zero biases."""
    p = preset("mup", "sgd", gamma_bar_L=gbar, base_width=4).with_(a=(0.0, 0.25, 0.5))
    net = build("mlp", (7,), 5, 12, p, depth=depth, activation=act, K=K, seeds=[3 + k for k in range(K)],
                bias=bias, dtype=dtype)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in net.layers:
            if layer.bias is not None:
                layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=gen, dtype=dtype))
    x = torch.randn(K, 6, 7, generator=gen, dtype=dtype)
    y = torch.randint(0, 5, (6,), generator=gen)
    return net, x, y


def _run(net, x, y, general: bool, monkeypatch, steps: int = 2, **kw):
    """``steps`` calls of PC.step (the weights kept fixed; the bound step's power iteration warm-starts across
    calls), with the fused path on or forced off: (grads, losses, values, perturbation, status)."""
    algo = PC(**kw)
    with monkeypatch.context() as m:
        if general:  # the rule's dispatch (rule.py) asks fused.applies; off, it takes state.step
            m.setattr("mulocal.algos.pc.rule.fused_applies", lambda pc, net: False)
        else:
            assert algo.fused(net), kw
        out = [algo.step(net, x, y) for _ in range(steps)]
    grads = [g for gs, _ in out for g in gs]
    losses = [loss for _, loss in out]
    v, _ = algo._last
    return grads, losses, v[1:], algo.perturbation(), algo.inference_status()


CASES = [  # activation, loss, T, init, gbar, gammas, kappa, no_status, depth
    ("tanh", "ce", 5, "forward", 0.0, None, 0.1, False, 3),  # the PCX comparison's setting
    ("tanh", "ce", 5, "forward", 0.0, None, None, False, 4),  # the default step: the curvature bound
    ("tanh", "ce", 1, "forward", 1.0, None, None, False, 4),  # T = 1: lower errors stay exactly 0
    ("tanh", "mse", 3, "forward", -1.0, (1.0, 2.5, 0.5), (0.2, 0.3, 0.1), False, 4),
    ("tanh", "ce", 3, "zero", 1.0, (0.5, 1.0, 2.0), None, False, 4),
    ("relu", "mse", 3, "random", 0.0, None, 0.2, False, 4),
    ("linear", "ce", 4, "forward", -1.0, None, None, True, 4),
    ("tanh", "ce", 2, "random", 0.0, (2.0, 1.0), 0.25, True, 3),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(str(v) for v in c).replace(" ", "") for c in CASES])
def test_fused_parallel_step_equals_the_general_step(case, monkeypatch):
    act, loss, T, init, gbar, gammas, kappa, no_status, depth = case
    kw = dict(loss=loss, T=T, inference="parallel", init=init, gammas=gammas, kappa=kappa, no_status=no_status)
    net, x, y = _net(act, gbar, depth)
    fused = _run(net, x, y, False, monkeypatch, **kw)
    general = _run(net, x, y, True, monkeypatch, **kw)
    for what, a, b in zip(("gradient", "loss", "value"), fused[:3], general[:3]):
        assert len(a) == len(b)
        for i, (p, q) in enumerate(zip(a, b)):
            assert p.shape == q.shape, (what, i)
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-13), (what, i, (p - q).abs().max())
    for key in fused[3]:
        assert torch.allclose(fused[3][key], general[3][key], rtol=1e-9, atol=1e-13), key
    st_f, st_g = fused[4], general[4]
    assert st_f.keys() == st_g.keys()
    if not no_status:
        assert st_f["energy_rose"] == st_g["energy_rose"] and st_f["steps"] == st_g["steps"] == 2
        if T > 1:
            assert st_f["residual"] == pytest.approx(st_g["residual"], rel=1e-9)


def test_fused_step_in_float32_trains_like_the_general_step(monkeypatch):
    """float32, K = 2, the optimizer in the loop: 5 training steps give the same losses and weights to float32
    rounding (the two paths round differently; nothing accumulates beyond that)."""
    from mulocal.optim import LayerwiseOptimizer

    def train(general):
        net, x, y = _net(dtype=torch.float32, depth=3)
        algo = PC(T=5, inference="parallel", kappa=0.1)
        opt = LayerwiseOptimizer.for_net(net, [0.1, 0.2], "sgd")
        losses = []
        with monkeypatch.context() as m:
            if general:
                m.setattr(PC, "fused", lambda self, net: False)
            for _ in range(5):
                g, loss = algo.step(net, x, y)
                opt.step(g)
                losses.append(loss)
        return torch.stack(losses), net.params()

    (lf, pf), (lg, pg) = train(False), train(True)
    assert torch.allclose(lf, lg, rtol=1e-5), (lf - lg).abs().max()
    for p, q in zip(pf, pg):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), (p - q).abs().max()


def test_fused_path_is_taken_only_where_it_applies():
    """Sequential inference, FPA, the guard, record, tol, momentum, incremental PC, residual nets and CNNs keep the
    general path (the fused one does not implement them)."""
    net, _, _ = _net()
    assert PC(T=3, inference="parallel").fused(net)
    for kw in (dict(inference="sequential"), dict(inference="parallel", fpa=True),
               dict(inference="parallel", guard=True), dict(inference="parallel", record=True),
               dict(inference="parallel", tol=1e-3), dict(inference="parallel", momentum=0.5),
               dict(inference="parallel", incremental=True)):
        assert not PC(T=3, **kw).fused(net), kw
    res = build("resmlp", (7,), 5, 12, preset("mup", "sgd"), depth=4, K=1, seeds=[0], dtype=torch.float64)
    cnn = build("cnn", (1, 8, 8), 5, 4, preset("mup", "sgd"), depth=3, K=1, seeds=[0], dtype=torch.float64)
    assert not PC(T=3, inference="parallel").fused(res)
    assert not PC(T=3, inference="parallel").fused(cnn)


def test_fused_step_leaves_the_feed_forward_values_alone(monkeypatch):
    """perturbation() compares the final values with the feed-forward ones kept from the same step: the fused
    step moves the values in place, so it must not move the feed-forward tensors with them (the perturbation
    would then read 0)."""
    net, x, y = _net()
    algo = PC(T=3, inference="parallel", kappa=0.2)
    algo.step(net, x, y)
    v, u_ff = algo._last
    u_again, _ = net.forward(x)
    for l in range(1, net.depth):
        assert torch.equal(u_ff[l], u_again[l])
        assert (v[l] - u_ff[l]).abs().max() > 0
