"""Depth, part 2: every learning rule on residual nets (``ResMLP`` and ``ResCNN``), against oracles written here.

The residual net of depth H is written out from its raw weights in tests/oracles.py (nothing from ``nets`` but
the weights; m_l the width multiplier, a = ((H - 2) / (H_0 - 2))^-alpha the branch multiplier from the formula):

    MLP:  h_1 = m_1 W_1 x + b_1,                 h_l = h_{l-1} + a (m_l W_l phi(h_{l-1}) + b_l),
          f = m_H W_H phi(h_{H-1}) + b_H
    CNN:  h_1 = m_1 conv(W_1, avgpool_2(x)) + b_1, h_l = h_{l-1} + a (m_l conv(W_l, phi(h_{l-1})) + b_l),
          f = m_H W_H flatten(maxpool_2(phi(h_{H-1}))) + b_H      (F.conv2d per replica, same padding)

* BP on the residual CNN: autograd of the written loss; PC: the written residual energy's gradient steps
  (sequential, explicit kappa) and autograd of it in the weights;
* TP / DTP targets on the stream: t_H = f - beta dloss/df, TP t_{l-1} = g_l(t_l), DTP t_{l-1} = h_{l-1} + g_l(t_l)
  - g_l(h_l), with the residual feedback written here from the raw feedback weights (V_l, c_l, multiplier n_l):
  g_l(t) = t + a (n_l V_l phi(t) + c_l) ("trainable") or t + a (n_l V_l t + c_l) ("linear"), g_H(f) = n_H V_H f
  + c_H reshaped to the stream; ridge (numpy solve): Q_l r = r + r H_l^T (H_l H_l^T + mu I)^-1 (H_{l-1} - H_l);
* local gradients: autograd of mean_batch 1/2 ||t_l - h_l(W_l, b_l)||^2 with h_{l-1}, t_l detached;
* feedback losses (rec, drl, ldrl): autograd of the documented losses with the written g_l and forward map
  f_l, on the rule's own noise draws (recorded), against the gradients handed to the feedback optimizer;
* a linear residual net with exact-inverse feedback: DTP targets = Gauss-Newton targets (GNT's Jacobians
  through the identity paths, checked against autograd too): two different computations that must agree;
* replica k of a K-replica residual DTP run equals a separate run (bitwise).

Tolerance: float64 compositions of O(H) products and small solves on O(1) numbers (sizes <= 200): 1e-10 relative
leaves orders of margin over rounding, and any equation error (an O(1) relative change) fails it. Each family has
a guard: a plausible wrong rule (the identity path dropped, the stream target read through phi') fails it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mulocal.algos import make_algo
from mulocal.nets import build
from mulocal.param import preset
from oracles import _lin, close
from oracles import WrittenResNet as Written


def _net(arch="resmlp", depth=5, act="tanh", algo="dtp", K=2, width=6, alpha=0.5, seeds=None, in_dim=7, out=4,
         optimizer="sgd", rand_bias=True):
    """A float64 residual net away from its base width and depth (multipliers != 1), non-zero biases."""
    p = preset("mup", optimizer, algo=algo, base_width=4).with_(a=(0.0, 0.25, 0.5), depth_alpha=alpha)
    shape = (2, 8, 8) if arch == "rescnn" else (in_dim,)
    net = build(arch, shape, out, width, p, depth=depth, activation=act, K=K,
                seeds=seeds if seeds is not None else [3 + k for k in range(K)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in net.layers if rand_bias else []:
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(K, 5, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, out, (5,), generator=gen)
    return net, x, y


def dldf(f, y, loss):
    f = f.detach().clone().requires_grad_()
    onehot = F.one_hot(y, f.shape[-1]).to(f.dtype).expand_as(f)
    val = -(torch.log_softmax(f, -1) * onehot).sum(-1) if loss == "ce" else 0.5 * (f - onehot).pow(2).sum(-1)
    return torch.autograd.grad(val.sum(), f)[0]


# ----------------------------------------------------------------------------- BP and PC on the residual CNN
@pytest.mark.parametrize("act,loss", [("tanh", "ce"), ("relu", "mse")])
def test_rescnn_forward_and_bp_equal_autograd_of_written_net(act, loss):
    net, x, y = _net("rescnn", depth=5, act=act, algo="bp")
    ref = Written(net, loss=loss)
    us, _ = net.forward(x)
    h = ref.forward(x)
    for l in range(1, net.depth + 1):
        ok, err = close(us[l], h[l])
        assert ok, (l, err)
    grads, _ = make_algo("bp", loss=loss).step(net, x, y)
    W, b, leaves = ref.leaves()
    expect = torch.autograd.grad(ref.loss_sum(ref.forward(x, W, b)[-1], y) / x.shape[1], leaves)
    for i, (g, e) in enumerate(zip(grads, expect)):
        ok, err = close(g, e)
        assert ok, (i, err)


@pytest.mark.parametrize("T,mode", [(1, "sequential"), (2, "sequential"), (2, "parallel"), (3, "parallel")])
def test_pc_on_rescnn_equals_written_residual_energy(T, mode):
    """Inference with an explicit step kappa: v_l <- v_l - kappa dE/dv_l (sequential: top down, each with the
    values as they are; parallel: every layer from one snapshot), E = sum_{l<H} 1/2 ||v_l - mu_l(v_{l-1})||^2 +
    loss(f(v_{H-1})); then grad W = autograd of E at the final values / B."""
    net, x, y = _net("rescnn", depth=5, algo="pc")
    pc = make_algo("pc", T=T, inference=mode, kappa=0.3, no_status=True)
    grads, _ = pc.step(net, x, y)
    ref = Written(net)
    v = ref.infer(ref.forward(x)[:-1], y, T, mode, [0.3] * (ref.H - 1))
    for l in range(1, ref.H):
        ok, err = close(pc._last[0][l], v[l])
        assert ok, (l, err)
    W, b, leaves = ref.leaves()
    expect = [g / x.shape[1] for g in torch.autograd.grad(ref.E([t.detach() for t in v], y, W, b), leaves)]
    for i, (g, e) in enumerate(zip(grads, expect)):
        ok, err = close(g, e)
        assert ok, (i, err)


# ----------------------------------------------------------------------------- TP / DTP: targets
def _randomize_feedback(algo, net, seed=5):
    algo.setup(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l in sorted(algo.fb):
            algo.fb[l].bias.copy_(0.2 * torch.randn(algo.fb[l].bias.shape, generator=gen, dtype=torch.float64))


class WrittenFeedback:
    """g_l from the raw feedback weights: a block's g(t) = t + a (n V phi(t) + c) (trainable) or t + a (n V t + c)
    (linear); g_H(f) = n V f + c reshaped to the stream. ``identity=False`` drops the identity path (guard)."""

    def __init__(self, algo, net, ref, identity=True):
        self.V = {l: algo.fb[l].weight.detach().clone() for l in algo.fb}
        self.c = {l: algo.fb[l].bias.detach().clone() for l in algo.fb}
        self.n = {l: algo.fb[l].rule.multiplier for l in algo.fb}
        self.ref, self.H, self.trainable, self.identity = ref, net.depth, algo.feedback == "trainable", identity

    def g(self, l, t, V=None, c=None):
        V = self.V[l] if V is None else V
        c = self.c[l] if c is None else c
        if l == self.H:
            return _lin(t, V, c, self.n[l])  # (K, B, n) -> reshaped by the caller
        inp = self.ref.phi(t) if self.trainable else t
        return (t if self.identity else 0) + self.ref.a * _lin(inp, V, c, self.n[l])


def written_targets(algo, net, x, y, loss, beta, difference, identity=True):
    ref = Written(net, loss=loss)
    h = ref.forward(x)
    fb = WrittenFeedback(algo, net, ref, identity)
    H = net.depth
    t = [None] * (H + 1)
    t[H] = h[H] - beta * dldf(h[H], y, loss)
    for l in range(H, 1, -1):
        shape = h[l - 1].shape

        def g(v):
            return fb.g(l, v).reshape(shape)
        t[l - 1] = h[l - 1] + g(t[l]) - g(h[l]) if difference else g(t[l])
    return t


RULES = [("dtp", "trainable"), ("dtp", "linear"), ("tp", "trainable"), ("tp", "linear")]


@pytest.mark.parametrize("arch", ["resmlp", "rescnn"])
@pytest.mark.parametrize("rule,feedback", RULES)
def test_residual_targets_equal_written(arch, rule, feedback):
    net, x, y = _net(arch, depth=5, algo=rule)
    algo = make_algo(rule, loss="mse", beta=0.7, feedback=feedback, fb_iters=0)
    _randomize_feedback(algo, net)
    algo.step(net, x, y)
    ref = written_targets(algo, net, x, y, "mse", 0.7, rule == "dtp")
    for l in range(1, net.depth + 1):
        ok, err = close(algo._last[2][l], ref[l])
        assert ok, (l, err)


def test_residual_target_oracle_can_fail():
    """Guard: the same feedback without its identity path gives other targets."""
    net, x, y = _net("resmlp", depth=5, algo="dtp")
    algo = make_algo("dtp", loss="mse", beta=0.7, fb_iters=0)
    _randomize_feedback(algo, net)
    algo.step(net, x, y)
    wrong = written_targets(algo, net, x, y, "mse", 0.7, False, identity=False)
    assert not close(algo._last[2][1], wrong[1])[0]


@pytest.mark.parametrize("arch", ["resmlp", "rescnn"])
@pytest.mark.parametrize("rule", ["dtp", "tp"])
def test_residual_ridge_targets_equal_numpy_solve(arch, rule):
    """Ridge feedback: a block maps r -> r + r H_l^T (H_l H_l^T + mu_l I)^-1 (H_{l-1} - H_l) (columns: samples,
    flattened; mu_l = ridge * n_l), the output layer r -> r F^T (F F^T + mu I)^-1 H_{H-1}."""
    net, x, y = _net(arch, depth=5, algo=rule)
    ridge = 0.05
    algo = make_algo(rule, loss="ce", beta=0.7, feedback="ridge", ridge=ridge)
    algo.step(net, x, y)
    h = [t.detach().numpy() for t in Written(net).forward(x)]
    H = net.depth
    K, B = x.shape[:2]
    flat = [v.reshape(K, B, -1) for v in h]
    t = [None] * (H + 1)
    t[H] = flat[H] - 0.7 * dldf(torch.as_tensor(h[H]), y, "ce").numpy()
    for l in range(H, 1, -1):
        out = np.empty_like(flat[l - 1])
        for k in range(K):
            Hl, Hp = flat[l][k], flat[l - 1][k]
            block = l < H
            target_fit = Hp - Hl if block else Hp
            G = Hl @ Hl.T + ridge * Hl.shape[1] * np.eye(B)
            r = t[l][k] - Hl if rule == "dtp" else t[l][k]
            q = np.linalg.solve(G, Hl @ r.T).T @ target_fit
            q = q + r if block else q
            out[k] = Hp + q if rule == "dtp" else q
        t[l - 1] = out
    for l in range(1, H):
        ok, err = close(algo._last[2][l].reshape(K, B, -1), torch.as_tensor(t[l]))
        assert ok, (l, err)


# ----------------------------------------------------------------------------- local gradients
def local_grad_oracle(net, x, t, ref):
    """autograd of sum_l mean_batch 1/2 ||t_l - h_l(W_l, b_l)||^2, h_{l-1} and t_l fixed (summed over K)."""
    h = [v.detach() for v in ref.forward(x)]
    W, b, leaves = ref.leaves()
    tot = sum(0.5 * (t[l].detach() - ref.layer(l, h[l - 1], W[l - 1], b[l - 1])).pow(2).sum() / x.shape[1]
              for l in range(1, net.depth + 1))
    return torch.autograd.grad(tot, leaves)


@pytest.mark.parametrize("arch", ["resmlp", "rescnn"])
@pytest.mark.parametrize("rule", ["dtp", "gnt"])
def test_residual_local_grads_equal_autograd_of_local_loss(arch, rule):
    net, x, y = _net(arch, depth=5, algo="dtp")
    algo = make_algo(rule, loss="ce", beta=0.7, **({"fb_iters": 0} if rule == "dtp" else {}))
    grads, _ = algo.step(net, x, y)
    expect = local_grad_oracle(net, x, algo._last[2], Written(net))
    for i, (g, e) in enumerate(zip(grads, expect)):
        ok, err = close(g, e)
        assert ok, (i, err)


def test_residual_local_grad_oracle_can_fail():
    """Guard: the stream target read through phi' (the plain nets' rule) gives other gradients."""
    net, x, y = _net("resmlp", depth=5, algo="dtp")
    algo = make_algo("dtp", loss="ce", beta=0.7, fb_iters=0)
    grads, _ = algo.step(net, x, y)
    us, acts = net.forward(x)
    t = algo._last[2]
    delta = net.linearize(2, us[2], acts[2])(us[2] - t[2])
    wrong = net.layers[1].grads(delta, acts[1])[0]
    assert not close(wrong, grads[2])[0]


# ----------------------------------------------------------------------------- feedback losses
def _run_feedback(net, x, feedback, fb_loss):
    algo = make_algo("dtp", feedback=feedback, fb_loss=fb_loss, sigma=0.3, fb_iters=1)
    _randomize_feedback(algo, net)
    draws, passed = [], []
    orig = algo._noise

    def noise(like, s):
        n = orig(like, s)
        draws.append(n.clone())
        return n
    algo._noise = noise
    algo.fb_opt.step = lambda g: passed.append([t.clone() for t in g])  # record, do not apply
    us, acts = net.forward(x)
    algo.prepare(net, us, acts, us[-1])
    return algo, draws, passed[0]


@pytest.mark.parametrize("arch", ["resmlp", "rescnn"])
@pytest.mark.parametrize("feedback,fb_loss", [("trainable", "rec"), ("linear", "drl"), ("trainable", "ldrl")])
def test_residual_feedback_gradients_equal_autograd_of_feedback_loss(arch, feedback, fb_loss):
    """rec: 1/2 ||g(f(h + xi)) - (h + xi)||^2; drl: 1/2 ||g(f(h + xi)) - g(f(h)) - xi||^2; ldrl: -xi . (g(f(h +
    xi)) - g(f(h))) + 1/2 ||g(f(h) + eta) - g(f(h))||^2 (batch mean; a residual CNN block's conv feedback divides
    by the stream's h w positions), f_l the written forward map, g_l the written residual feedback, on the rule's
    own noise; autograd in (V_l, c_l) = what the optimizer was handed."""
    net, x, y = _net(arch, depth=5, algo="dtp")
    algo, draws, passed = _run_feedback(net, x, feedback, fb_loss)
    ref = Written(net)
    fb = WrittenFeedback(algo, net, ref)
    h = [v.detach() for v in ref.forward(x)]
    H, B = net.depth, x.shape[1]
    per = 2 if fb_loss == "ldrl" else 1
    for i, l in enumerate(range(2, H + 1)):
        V = fb.V[l].clone().requires_grad_()
        c = fb.c[l].clone().requires_grad_()
        shape = h[l - 1].shape

        def g(v):
            return fb.g(l, v, V, c).reshape(shape)
        xi = draws[per * i]
        a_n = h[l - 1] + xi
        h_n = ref.layer(l, a_n)
        if fb_loss == "rec":
            val = 0.5 * (g(h_n) - a_n).pow(2).sum()
        elif fb_loss == "drl":
            val = 0.5 * (g(h_n) - g(h[l]) - xi).pow(2).sum()
        else:
            eta = draws[per * i + 1]
            val = -(xi * (g(h_n) - g(h[l]))).sum() + 0.5 * (g(h[l] + eta) - g(h[l])).pow(2).sum()
        # a block's conv feedback (residual CNN) averages its loss over the stream's h w positions (docs/tp.md);
        # dense feedback (every g of the residual MLP, g_H of the residual CNN) sums it
        P = shape[-2] * shape[-1] if arch == "rescnn" and l < H else 1
        eV, ec = torch.autograd.grad(val / (B * P), [V, c])
        top = max(float(eV.abs().max()), float(ec.abs().max()))  # ldrl's bias gradient is exactly 0
        for got, e in ((passed[2 * i], eV), (passed[2 * i + 1], ec)):
            ok, err = close(got, e, scale=top)
            assert ok, (l, err)


# ----------------------------------------------------------------------------- inverse feedback = Gauss-Newton
def _linear_resnet(n=6, depth=5):
    p = preset("sp", base_width=n).with_(depth_alpha=0.5)
    net = build("resmlp", (n,), n, n, p, depth=depth, activation="linear", K=2, seeds=[0, 1], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.eye(n) + 0.3 * torch.randn(net.layers[0].weight.shape, generator=gen,
                                                                       dtype=torch.float64) / n ** 0.5)
        net.layers[-1].weight.copy_(torch.eye(n) + 0.3 * torch.randn(net.layers[-1].weight.shape, generator=gen,
                                                                        dtype=torch.float64) / n ** 0.5)
    return net


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_dtp_inverse_equals_gnt_on_linear_resnet(loss):
    """Linear residual net, exact-inverse feedback ((I + a m W)^-1 through a block): DTP targets = GNT targets
    (lambda -> 0, J_l = df/du_l through the identity paths), and so the local gradients."""
    net = _linear_resnet()
    x, y = torch.randn(2, 5, 6, dtype=torch.float64), torch.randint(0, 6, (5,))
    dtp = make_algo("dtp", loss=loss, feedback="inverse", beta=0.7)
    gnt = make_algo("gnt", loss=loss, damping=1e-13, beta=0.7)
    g1, _ = dtp.step(net, x, y)
    g2, _ = gnt.step(net, x, y)
    for l in range(1, net.depth):
        ok, err = close(dtp._last[2][l], gnt._last[2][l], 1e-8)
        assert ok, (l, err)
    for a, b in zip(g1, g2):
        ok, err = close(a, b, 1e-8)
        assert ok, err
    # guard: without the identity in the inverse, the targets differ
    us, _ = net.forward(x)
    layer = net.layers[2]
    wrong = torch.bmm((dtp._last[2][3] - us[3]), torch.linalg.pinv(layer.weight * layer.mult).transpose(1, 2))
    right = dtp._last[2][2] - us[2]
    assert not close(wrong, right, 1e-3)[0]


def test_gnt_jacobians_through_identity_paths_equal_autograd():
    from mulocal.algos.gnt import GNT
    net, x, _ = _net("resmlp", depth=5, algo="bp")
    us, acts = net.forward(x)
    J = GNT.jacobians(net, us, acts)
    ref = Written(net)
    for l in (1, 2, 4):
        def f_from(hl):
            h = hl
            for j in range(l + 1, net.depth + 1):
                h = ref.layer(j, h)
            return h
        jac = torch.autograd.functional.jacobian(f_from, us[l])  # (K, B, C, K, B, n)
        for k in range(2):
            for s in range(x.shape[1]):
                ok, err = close(J[l][k, s], jac[k, s, :, k, s])
                assert ok, (l, k, s, err)


# ----------------------------------------------------------------------------- replicas
@pytest.mark.parametrize("arch", ["resmlp", "rescnn"])
def test_residual_dtp_replica_equals_separate_run(arch):
    """Two SGD steps of DTP (trained feedback, host noise): replica 1 of a K = 2 run is the K = 1 run of its seed, to
    the rounding of kernels of another batch shape (float64: a chain of two training steps of both the net and its
    feedback, ``tolerances.train_ops``; a replica index off by one or a shared noise stream moves it by O(1))."""
    from mulocal.optim import LayerwiseOptimizer
    outs = []
    for K, seeds in ((2, [3, 4]), (1, [4])):
        net, _, _ = _net(arch, depth=5, K=K, seeds=seeds, rand_bias=False)
        gen = torch.Generator().manual_seed(1)
        shape = net.input_shape
        xs = [torch.randn(5, *shape, generator=gen, dtype=torch.float64) for _ in range(2)]
        y = torch.randint(0, 4, (5,), generator=gen)
        algo = make_algo("dtp", sigma=0.2)
        opt = LayerwiseOptimizer.for_net(net, 0.1, "sgd")
        for xb in xs:
            opt.step(algo.step(net, xb, y)[0])
        outs.append([p[-1].clone() for p in net.params()])
    from tolerances import chain_rtol, train_ops
    rtol = chain_rtol(torch.float64, 2 * train_ops(2, 5, 8 * 9), cond=10)  # net + feedback; widest fan-in C k^2
    for a, b in zip(*outs):
        ok, err = close(a, b, rtol=rtol)
        assert ok, err


# ----------------------------------------------------------------------------- checks across depth (scaling laws)
def _depth_batches(steps=3, n_in=20, C=5):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, n_in, generator=gen), torch.randint(0, C, (64,), generator=gen)) for _ in range(steps)]
    return batches, torch.randn(128, n_in, generator=gen)


DEPTHS = [8, 16, 32, 64]


@pytest.mark.parametrize("algo,opts,lr", [("bp", {}, 0.5), ("dtp", {}, 0.1), ("tp", {"feedback": "ridge"}, 0.1)])
def test_depth_coord_check_flat_under_depth_mup_for_every_rule(algo, opts, lr):
    """``coord_check(axis="depth")`` over H = 8..64 (width 64, 3 SGD steps): every counted quantity (streams,
    their changes, the input layer's and the blocks' summed own updates, df) is flat per doubling of depth
    under depth-muP (measured max |slope| 0.11 BP, 0.07 DTP, 0.09 TP ridge) and grows without the depth factors
    (the depth-free control: 1.64, 1.64, 0.86); a single block's own update shrinks like 1/(H - 2) (not
    counted: slope about -1.1 per doubling of H over this range)."""
    from mulocal.diagnostics.coord import coord_check
    batches, probe = _depth_batches()
    p = preset("mup", "sgd", algo=algo)

    def run(param):
        return coord_check(lambda H: build("resmlp", (20,), 5, 64, param, depth=H, K=2, seeds=[0, 1]),
                           make_algo(algo, **opts), DEPTHS, batches, probe, lr, axis="depth")
    flat = run(p)
    assert flat.axis == "depth" and "dWh_blocks" in flat.counted and "dWh_last" not in flat.counted
    assert flat.max_abs_slope <= 0.15, flat.slopes
    assert -1.4 < flat.slopes["dWh_last"] < -0.8
    grows = run(p.depth_free())
    assert grows.max_abs_slope > 0.5 and grows.slopes["dh_last"] > 0.5, grows.slopes


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 1e-3)])
def test_derive_depth_finds_depth_mup_from_the_depth_free_start(optimizer, lr):
    """The depth fitter, started at alpha = 0 and c_H = 0, lands on Depth-muP: alpha = 1/2 and c_H = 1 - 2 alpha
    (SGD: 0) or 1 - alpha (Adam: 1/2), within 0.15 (measured on FashionMNIST at width 64: 0.49 / -0.05 and 0.49 /
    0.48)."""
    from mulocal.diagnostics.derive import derive_depth
    batches, probe = _depth_batches(steps=1)
    ref = preset("mup", optimizer)
    res = derive_depth(lambda p, H: build("resmlp", (20,), 5, 64, p, depth=H, K=2, seeds=[0, 1], bias=False),
                       make_algo("bp"), ref.depth_free(), DEPTHS, batches, probe, lr, optimizer, rounds=6,
                       reference=ref)
    assert res.rounds[0]["alpha"] == 0.0 and res.rounds[0]["c_H"] == 0.0
    assert res.agrees, res.to_dict()
    assert abs(res.alpha - 0.5) <= 0.15 and abs(res.c_H - ref.depth_lr_exponent()) <= 0.15


def test_depth_checks_on_the_command_line():
    import json
    import subprocess
    import sys
    base = [sys.executable, "-m", "mulocal.cli", "coord", "--dataset", "synthetic", "--depths", "4,8", "--widths",
            "16", "--steps", "1", "--replicas", "1"]
    p = subprocess.run(base + ["--arch", "resmlp", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["axis"] == "depth" and out["checks"][0]["depths"] == [4, 8] and out["checks"][0]["width"] == 16
    bad = subprocess.run(base, capture_output=True, text=True, timeout=300)  # an MLP: not residual
    assert bad.returncode == 2 and "--depths needs a residual net" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- every layer learns
def test_layer_changes_equal_one_sgd_step_of_the_written_gradient():
    """One SGD step at lr with every LR factor 1 (SP at its base width, Depth-muP with SGD: c_H = 0) moves
    W_l by -lr grad_l, so dW_rel[l] = lr ||grad_l|| / ||W_l(0)|| with grad_l autograd of the written net's loss."""
    from mulocal.diagnostics.layers import layer_changes
    p = preset("sp", "sgd", base_width=6)
    net = build("resmlp", (7,), 4, 6, p, depth=6, K=2, seeds=[3, 4], dtype=torch.float64)
    assert all(layer.rule.lr_scale == 1.0 for layer in net.layers)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randint(0, 4, (5,), generator=gen)
    probe = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    ref = Written(net)
    W, b, leaves = ref.leaves()
    xk = x.expand(2, *x.shape)
    grads = torch.autograd.grad(ref.loss_sum(ref.forward(xk, W, b)[-1], y) / 5, W)
    h0 = [t.detach() for t in ref.forward(probe.expand(2, *probe.shape))]
    res = layer_changes(net, make_algo("bp"), [(x, y)], probe, 0.1)
    for l in range(1, 7):
        expect = (0.1 * grads[l - 1].flatten(1).norm(dim=1) / ref.W[l - 1].flatten(1).norm(dim=1)).mean()
        ok, err = close(res.dW_rel[l - 1], expect)
        assert ok, (l, err)
    h1 = Written(net).forward(probe.expand(2, *probe.shape))  # the trained weights, written out again
    for l in range(1, 7):
        expect = ((h1[l] - h0[l]).flatten(1).norm(dim=1) / h0[l].flatten(1).norm(dim=1)).mean()
        ok, err = close(res.du_rel[l - 1], expect)
        assert ok, (l, err)


def test_layer_result_ratios():
    from mulocal.diagnostics.layers import LayerResult
    r = LayerResult(depth=6, steps=1, dW_rel=[9.0, 0.05, 0.3, 0.6, 0.4, 7.0], du_rel=[1.0] * 6)
    assert r.top == 5 and r.ratio_top[4] == 1.0
    assert r.min_ratio == pytest.approx(0.05 / 0.4)  # blocks 2..4 against the top block 5; layers 1 and 6 not
    assert r.within_10x
    r.dW_rel[1] = 0.039
    assert not r.within_10x and r.min_ratio == pytest.approx(0.039 / 0.4)


def test_analyze_layers_on_the_command_line():
    import json
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "mulocal.cli", "analyze", "layers", "--dataset", "synthetic", "--depth",
                        "6", "--widths", "16", "--algos", "bp,pc", "--kappa", "1", "--steps", "2", "--replicas", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["width"] == 16 and set(out["configs"]) == {"bp mup-sgd", "pc mup-sgd kappa=1.0"}
    assert all(len(c["dW_rel"]) == 6 for c in out["configs"].values())
    # the command is the library call: the same numbers from layer_changes on the same batches and net
    from mulocal.data import load_dataset
    from mulocal.diagnostics.coord import coord_batches
    from mulocal.diagnostics.layers import layer_changes
    data = load_dataset("synthetic")
    batches, probe = coord_batches(data, 2, 64)
    net = build("resmlp", data.input_shape, data.n_classes, 16, preset("mup", "sgd", algo="pc"), depth=6, K=1,
                seeds=[0])
    direct = layer_changes(net, make_algo("pc", kappa=1.0), batches, probe, 0.1)
    assert out["configs"]["pc mup-sgd kappa=1.0"]["dW_rel"] == pytest.approx(direct.dW_rel, rel=1e-6)
    bad = subprocess.run([sys.executable, "-m", "mulocal.cli", "analyze", "cosine", "--dataset", "synthetic",
                          "--kappa", "1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "rule options apply to analyze layers and features only" in bad.stderr
