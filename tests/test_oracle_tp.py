"""Exact oracles for the target rules of ``algos/tp/`` (TP, DTP, their feedback) and ``algos/gnt.py``.

Every expected value is computed here from the raw weights, independently of the rule under test:

* local gradients: torch.autograd of mean_batch 1/2 ||h_l - t_l||^2 in (W_l, b_l) only, with the layer
  written out here (h_l = post(mult W_l a_{l-1} + b_l), h_L = f; the CNN with F.conv2d per replica and
  max-pooling), t_l and a_{l-1} detached;
* targets (numpy): t_L = f - beta dloss/df, TP t_{l-1} = g_l(t_l), DTP t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)
  with g_l = phi(V a + c) ("trainable") or V a + c ("linear"); the CNN's conv feedback is nearest
  upsampling (index floor(i h / H)) then a same-padded cross-correlation, times mult, plus bias;
* ridge feedback (numpy.linalg.solve): r -> r H_l^T (H_l H_l^T + mu_l I)^{-1} H_{l-1}, mu_l = ridge * n_l;
* feedback losses rec / drl / ldrl: the documented per-sample losses (batch mean; the CNN's conv feedback
  averages its per-sample loss over the H W positions of its output map, channels summed: tests/
  test_tp_conv_feedback.py) with the rule's own noise draws recorded, and autograd of them in (V_l, c_l)
  against the gradients handed to the optimizer;
* inverse feedback (numpy): t_{l-1} = h_{l-1} + pinv(mult W_l) (t_l - h_l) on a linear net;
* GNT (numpy): t_l = h_l - beta J_l^T (J_l J_l^T + lambda I)^{-1} dloss/df, J_l = df/dh_l by the chain rule.

Each family has a guard test showing its comparison fails on a wrong rule or a wrong formula.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mulocal.algos import make_algo
from mulocal.nets import build
from mulocal.param import preset

# Tolerance: every compared quantity is a float64 composition of a handful of matrix products, small
# linear solves (condition numbers <= ~1e3 here) and tanh/exp on O(1) numbers, with sizes <= 96; rounding
# is ~1e-16 * size * condition <= ~1e-12 relative, so 1e-10 (relative to the reference's largest entry)
# leaves a wide margin while any formula error (an O(1) relative change) fails it.
RTOL = 1e-10

A_EXP = (-0.5, 0.5, 1.0)  # forward-multiplier exponents: mult = m^-a per role, m = width / base width
BASE = 4
C_OUT = 3


def close(a, b, rtol=RTOL, scale=None):
    """(max |a - b| <= rtol * max |b|, the relative error); ``scale`` replaces max |b| where the reference
    is exactly 0 in exact arithmetic (then rounding is relative to the terms that cancel)."""
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a, dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max() if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    err = float((a - b).abs().max() / scale.clamp_min(1e-300))
    return err <= rtol, err


# ----------------------------------------------------------------------------- set-up
def make_net(arch="mlp", act="tanh", depth=3, B=5, seed=7):
    """K = 2 replicas (seeds 1, 2), width != base width (multipliers != 1), random non-zero biases,
    per-replica inputs and labels."""
    p = preset("mup", "sgd", algo="dtp", base_width=BASE, a=A_EXP)
    shape = (1, 8, 8) if arch == "cnn" else (5,)
    width = 6 if arch == "cnn" else 8
    net = build(arch, shape, C_OUT, width, p, depth=depth if arch == "mlp" else 3, activation=act, K=2,
                seeds=[1, 2], dtype=torch.float64)
    m = width / BASE
    roles = [0] + [1] * (net.depth - 2) + [2]
    for layer, r in zip(net.layers, roles):  # the multipliers the parameterization promises, not 1
        assert layer.mult == pytest.approx(m ** -A_EXP[r], rel=1e-14)
    assert any(layer.mult != 1 for layer in net.layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(2, B, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C_OUT, (2, B), generator=gen)
    return net, x, y


def randomize_feedback(algo, net, seed=3):
    """Create the feedback layers, give them random biases and check their multipliers are != 1."""
    algo.setup(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fb in algo.fb.values():
            fb.bias.copy_(0.2 * torch.randn(fb.bias.shape, generator=gen, dtype=torch.float64))
    assert any(fb.mult != 1 for fb in algo.fb.values())


# ----------------------------------------------------------------------------- torch forward (own)
def t_phi(name):
    return {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda u: u}[name]


def t_layer(net, l, a, W, b):
    """u_l = mult W_l a + b_l from the given weights (K leading)."""
    mult = net.layers[l - 1].mult
    if W.dim() == 3:
        return mult * torch.einsum("kbi,koi->kbo", a.flatten(2), W) + b[:, None, :]
    pad = W.shape[-1] // 2
    return torch.stack([mult * F.conv2d(a[k], W[k], padding=pad) + b[k][None, :, None, None]
                        for k in range(W.shape[0])])


def t_post(net, l, u):
    """h_l from u_l (l < L): phi; for the CNN then 2x2 max-pooling, flattened at the last conv."""
    h = t_phi(net.activation)(u)
    if net.kind == "mlp":
        return h
    h = torch.stack([F.max_pool2d(h[k], 2) for k in range(h.shape[0])])
    return h.flatten(2) if l == net.depth - 1 else h


def t_forward(net, x):
    """[h_0, ..., h_{L-1}], f and the unflattened shape of every h_l (per sample)."""
    x = x.to(torch.float64)
    h = [x.flatten(2) if net.kind == "mlp" else x]
    shapes = [tuple(x.shape[2:])]
    for l in range(1, net.depth):
        layer = net.layers[l - 1]
        u = t_layer(net, l, h[-1], layer.weight, layer.bias)
        shapes.append(tuple(u.shape[2:3]) + tuple(s // 2 for s in u.shape[3:]) if u.dim() == 5 else tuple(u.shape[2:]))
        h.append(t_post(net, l, u))
    last = net.layers[-1]
    return h, t_layer(net, net.depth, h[-1], last.weight, last.bias), shapes


def local_grad_oracle(net, x, t):
    """autograd of mean_batch 1/2 ||h_l - t_l||^2 in (W_l, b_l), t_l and a_{l-1} detached."""
    with torch.no_grad():
        h, _, _ = t_forward(net, x)
    out = []
    for l in range(1, net.depth + 1):
        layer = net.layers[l - 1]
        W = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        u = t_layer(net, l, h[l - 1].detach(), W, b)
        hl = u if l == net.depth else t_post(net, l, u)
        loss = 0.5 * (hl - t[l].detach()).pow(2).flatten(2).sum(-1).mean(-1)  # (K,): per replica
        out += list(torch.autograd.grad(loss.sum(), [W, b]))
    return out


# ----------------------------------------------------------------------------- numpy forward (own)
def n_phi(name):
    return {"tanh": np.tanh, "relu": lambda u: np.maximum(u, 0.0), "linear": lambda u: u}[name]


def n_conv(x, w, b, mult):
    """Same-padded cross-correlation: x (B, C, H, W), w (O, C, k, k) -> mult * conv + b."""
    k = w.shape[-1]
    p = k // 2
    H, W = x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros((x.shape[0], w.shape[0], H, W))
    for i in range(k):
        for j in range(k):
            for o in range(w.shape[0]):
                for c in range(w.shape[1]):
                    out[:, o] += w[o, c, i, j] * xp[:, c, i:i + H, j:j + W]
    return mult * out + b[None, :, None, None]


def n_pool(a):
    B, C, H, W = a.shape
    return a.reshape(B, C, H // 2, 2, W // 2, 2).max(axis=(3, 5))


def n_up(a, H, W):
    """Nearest upsampling of (B, C, h, w) to (H, W): index floor(i h / H)."""
    h, w = a.shape[2:]
    return a[:, :, (np.arange(H) * h) // H][:, :, :, (np.arange(W) * w) // W]


class NumpyNet:
    """Replica k of a net, from its weights, in numpy."""

    def __init__(self, net, k):
        self.kind, self.L, self.act = net.kind, net.depth, net.activation
        self.phi = n_phi(net.activation)
        self.W = [layer.weight[k].numpy().copy() for layer in net.layers]
        self.b = [layer.bias[k].numpy().copy() for layer in net.layers]
        self.mult = [layer.mult for layer in net.layers]

    def forward(self, x):
        """h_0..h_{L-1} (flattened where the net flattens), pre-activations u_1..u_L, f, unflat shapes."""
        h = [x.reshape(x.shape[0], -1) if self.kind == "mlp" else x]
        us, shapes = [None], [x.shape[1:]]
        for l in range(1, self.L):
            W, b, m = self.W[l - 1], self.b[l - 1], self.mult[l - 1]
            if self.kind == "mlp":
                u = m * h[-1] @ W.T + b
                a = self.phi(u)
            else:
                u = n_conv(h[-1], W, b, m)
                a = n_pool(self.phi(u))
            us.append(u)
            shapes.append(a.shape[1:])
            h.append(a.reshape(a.shape[0], -1) if l == self.L - 1 else a)
        f = self.mult[-1] * h[-1] @ self.W[-1].T + self.b[-1]
        us.append(f)
        return h, us, f, shapes


def n_dldf(f, y, loss):
    onehot = np.eye(f.shape[1])[y]
    if loss == "ce":
        e = np.exp(f - f.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True) - onehot
    return f - onehot


def n_feedback(algo, net, k, l, v, trainable, shapes):
    """g_l(v) for replica k, from the feedback weights: Dense, or upsample + conv to h_{l-1}'s shape."""
    fb = algo.fb[l]
    V, c, m = fb.weight[k].numpy(), fb.bias[k].numpy(), fb.mult
    if V.ndim == 2:
        z = m * v.reshape(v.shape[0], -1) @ V.T + c
    else:
        up = n_up(v.reshape(v.shape[0], *shapes[l]), *shapes[l - 1][1:])
        z = n_conv(up, V, c, m)
    return n_phi(net.activation)(z) if trainable else z


def n_targets(algo, net, x, y, loss, beta, difference, feedback, ridge=None, mu_per_unit=True, inv_mult=True):
    """[t_1..t_L] per replica (index l; 0 unused), each as the rule lays it out (per sample)."""
    out = []
    for k in range(net.K):
        nn = NumpyNet(net, k)
        h, us, f, shapes = nn.forward(x[k].numpy())
        hh = h + [f]
        t = [None] * (nn.L + 1)
        t[nn.L] = f - beta * n_dldf(f, y[k].numpy(), loss)
        for l in range(nn.L, 1, -1):
            if feedback in ("trainable", "linear"):
                g = lambda v: n_feedback(algo, net, k, l, v, feedback == "trainable", shapes)  # noqa: E731
            elif feedback == "ridge":
                H = hh[l].reshape(hh[l].shape[0], -1)
                Hp = hh[l - 1].reshape(hh[l - 1].shape[0], -1)
                mu = ridge * H.shape[1] if mu_per_unit else ridge
                G = H @ H.T + mu * np.eye(H.shape[0])
                g = lambda v, H=H, Hp=Hp, G=G: (np.linalg.solve(G, H @ v.reshape(v.shape[0], -1).T).T @ Hp)  # noqa
            else:  # inverse
                W = (nn.mult[l - 1] if inv_mult else 1.0) * nn.W[l - 1]
                g = lambda v, W=W: v @ np.linalg.pinv(W).T  # noqa: E731
            if difference:
                t[l - 1] = hh[l - 1] + (g(t[l]) - g(hh[l])).reshape(hh[l - 1].shape)
            else:
                t[l - 1] = g(t[l]).reshape(hh[l - 1].shape)
        out.append(t)
    return out


def compare_targets(t_code, t_ref, L, layers=None):
    """Worst relative error over layers 1..L (or ``layers``) and replicas."""
    layers = range(1, L + 1) if layers is None else layers
    errs = [close(t_code[l][k], t_ref[k][l])[1] for l in layers for k in range(len(t_ref))]
    return max(errs)


# ----------------------------------------------------------------------------- 1. local gradients
ALGO_CASES = {
    "tp-trainable": ("tp", dict(feedback="trainable")),
    "dtp-trainable": ("dtp", dict(feedback="trainable")),
    "dtp-linear": ("dtp", dict(feedback="linear")),
    "dtp-ridge": ("dtp", dict(feedback="ridge", ridge=0.05)),
    "tp-ridge": ("tp", dict(feedback="ridge", ridge=0.05)),
    "gnt": ("gnt", dict(damping=1e-3)),
}
NET_CASES = [("mlp", "tanh", "ce"), ("mlp", "relu", "mse"), ("cnn", "tanh", "ce")]


def _make_algo(case, loss, beta=0.7):
    name, opts = ALGO_CASES[case]
    if name != "gnt":
        opts = dict(opts, fb_iters=1, sigma=0.1, fb_lr=0.05)
    return make_algo(name, loss=loss, beta=beta, **opts)


@pytest.mark.parametrize("arch,act,loss", NET_CASES)
@pytest.mark.parametrize("case", list(ALGO_CASES))
def test_local_grads_equal_autograd_of_local_loss(case, arch, act, loss):
    """Every layer's update is the gradient of its own local loss with its target held fixed."""
    net, x, y = make_net(arch, act, B=5 if arch == "mlp" else 3)
    algo = _make_algo(case, loss)
    grads, _ = algo.step(net, x, y)
    acts, f, t = algo._last
    h, f_ref, _ = t_forward(net, x)  # sanity: the own forward pass is the net's
    assert close(f, f_ref)[0] and all(close(a, b)[0] for a, b in zip(acts, h))
    ref = local_grad_oracle(net, x, t)
    assert len(grads) == len(ref) == 2 * net.depth
    for i, (g, r) in enumerate(zip(grads, ref)):
        ok, err = close(g, r)
        assert ok, (i, err)


def test_local_grad_oracle_can_fail():
    """Guard: a rule that drops phi' (J_l) in the local delta is caught."""
    net, x, y = make_net("mlp", "tanh")
    algo = _make_algo("dtp-trainable", "ce")
    net.linearize = lambda l, u, a=None: (lambda g: g)
    grads, _ = algo.step(net, x, y)
    ref = local_grad_oracle(net, x, algo._last[2])
    assert close(grads[-2], ref[-2])[0]  # the output layer has no phi'
    assert not close(grads[0], ref[0], rtol=1e-3)[0]
    assert not close(grads[2], ref[2], rtol=1e-3)[0]


# ----------------------------------------------------------------------------- 2. targets, trainable feedback
def _target_cases():
    out = []
    for kind in ("tp", "dtp"):
        for feedback in ("trainable", "linear"):
            for arch in ("mlp", "cnn"):
                for loss in ("ce", "mse"):
                    # (tp, linear, cnn) caught a real bug: the feedback bias broadcast along W, not channels
                    out.append(pytest.param(kind, feedback, arch, loss))
    return out


@pytest.mark.parametrize("kind,feedback,arch,loss", _target_cases())
def test_targets_equal_numpy(kind, feedback, arch, loss):
    """t_L = f - beta dl/df; TP t_{l-1} = g_l(t_l); DTP h_{l-1} + g_l(t_l) - g_l(h_l), with the feedback
    weights as they are after the step (trained once before the targets)."""
    net, x, y = make_net(arch, "tanh", depth=4 if arch == "mlp" else 3, B=5 if arch == "mlp" else 3)
    algo = make_algo(kind, loss=loss, beta=0.7, feedback=feedback, fb_iters=1, sigma=0.1, fb_lr=0.05)
    randomize_feedback(algo, net)
    before = {l: fb.weight.clone() for l, fb in algo.fb.items()}
    algo.step(net, x, y)
    assert all(not torch.equal(before[l], algo.fb[l].weight) for l in algo.fb)  # feedback was trained
    t = algo._last[2]
    ref = n_targets(algo, net, x, y, loss, 0.7, kind == "dtp", feedback)
    err = compare_targets(t, ref, net.depth)
    assert err <= RTOL, err


def test_target_oracle_can_fail():
    """Guard: stale (pre-training) feedback weights, or the other TP variant, do not pass."""
    net, x, y = make_net("mlp", "tanh", depth=4)
    algo = make_algo("dtp", loss="ce", beta=0.7, feedback="trainable", fb_iters=1, sigma=0.1, fb_lr=0.05)
    randomize_feedback(algo, net)
    stale = {l: (fb.weight.clone(), fb.bias.clone()) for l, fb in algo.fb.items()}
    algo.step(net, x, y)
    t = algo._last[2]
    assert compare_targets(t, n_targets(algo, net, x, y, "ce", 0.7, True, "trainable"), net.depth) <= RTOL
    assert compare_targets(t, n_targets(algo, net, x, y, "ce", 0.7, False, "trainable"), net.depth) > 1e-3
    assert compare_targets(t, n_targets(algo, net, x, y, "ce", 0.7, True, "linear"), net.depth) > 1e-3
    for l, (w, b) in stale.items():
        algo.fb[l].weight.copy_(w)
        algo.fb[l].bias.copy_(b)
    assert compare_targets(t, n_targets(algo, net, x, y, "ce", 0.7, True, "trainable"), net.depth) > 1e-6


# ----------------------------------------------------------------------------- 3. ridge feedback
@pytest.mark.parametrize("kind", ["tp", "dtp"])
@pytest.mark.parametrize("arch,loss", [("mlp", "ce"), ("mlp", "mse"), ("cnn", "ce")])
def test_ridge_targets_equal_numpy_solve(kind, arch, loss):
    """Ridge feedback: r -> r H_l^T (H_l H_l^T + ridge n_l I)^{-1} H_{l-1} at every layer."""
    net, x, y = make_net(arch, "tanh", depth=4 if arch == "mlp" else 3, B=5 if arch == "mlp" else 3)
    algo = make_algo(kind, loss=loss, beta=0.7, feedback="ridge", ridge=0.05)
    algo.step(net, x, y)
    ref = n_targets(algo, net, x, y, loss, 0.7, kind == "dtp", "ridge", ridge=0.05)
    err = compare_targets(algo._last[2], ref, net.depth)
    assert err <= RTOL, err


def test_ridge_oracle_can_fail():
    """Guard: mu = ridge (not ridge * n_l) gives other targets."""
    net, x, y = make_net("mlp", "tanh", depth=4)
    algo = make_algo("dtp", loss="ce", beta=0.7, feedback="ridge", ridge=0.05)
    algo.step(net, x, y)
    ref = n_targets(algo, net, x, y, "ce", 0.7, True, "ridge", ridge=0.05, mu_per_unit=False)
    assert compare_targets(algo._last[2], ref, net.depth) > 1e-4


# ----------------------------------------------------------------------------- 4. feedback losses
def t_feedback(net, fbl, l, v, V, c, trainable, shapes):
    """g_l(v) from (V, c): dense, or nearest-upsampling (index gather) + per-replica conv2d."""
    if V.dim() == 3:
        z = fbl.mult * torch.einsum("kbi,koi->kbo", v.flatten(2), V) + c[:, None, :]
    else:
        K, B = v.shape[:2]
        v = v.reshape(K, B, *shapes[l])
        H, W = shapes[l - 1][1:]
        h, w = shapes[l][1:]
        v = v[..., (torch.arange(H) * h) // H, :][..., (torch.arange(W) * w) // W]
        pad = V.shape[-1] // 2
        z = torch.stack([fbl.mult * F.conv2d(v[k], V[k], padding=pad) + c[k][None, :, None, None] for k in range(K)])
    return t_phi(net.activation)(z) if trainable else z


def fb_loss_oracle(net, algo, fbw, h, noises, feedback, fb_loss):
    """Per layer l: the documented batch-mean loss (K,), the RMS residual (K,), and autograd grads of the
    loss in (V_l, c_l) with the noise and the activities fixed. ``fbw``: the pre-training (V, c)."""
    L = net.depth
    _, _, shapes = t_forward(net, torch.zeros(net.K, 1, *net.input_shape, dtype=torch.float64))
    noises = list(noises)
    values, rms, grads = {}, {}, []
    for l in range(2, L + 1):
        layer, fbl = net.layers[l - 1], algo.fb[l]
        V, c = (p.detach().clone().requires_grad_() for p in fbw[l])

        def fwd(a):  # forward layer l: h_{l-1} -> h_l (the output layer without activation)
            u = t_layer(net, l, a, layer.weight, layer.bias)
            return u if l == L else t_post(net, l, u)

        def g(v):
            return t_feedback(net, fbl, l, v, V, c, feedback == "trainable", shapes)

        xi = noises.pop(0)
        hp, hl = h[l - 1], h[l]
        g_n = g(fwd(hp + xi))
        if fb_loss == "rec":
            r = g_n - (hp + xi)
            per = 0.5 * r.pow(2)
        else:
            g_0 = g(hl)
            r = g_n - g_0 - xi
            if fb_loss == "drl":
                per = 0.5 * r.pow(2)
            else:
                eta = noises.pop(0)
                per = -xi * (g_n - g_0) + 0.5 * (g(hl + eta) - g_0).pow(2)
        # per sample: summed over a dense feedback's coordinates; a conv feedback's (its output a map (C, H, W))
        # summed over the channels and averaged over its P = H W positions (docs/tp.md); then the batch mean
        value = (per.sum(2).mean((-2, -1)) if per.dim() == 5 else per.sum(-1)).mean(-1)  # (K,)
        values[l] = value.detach()
        rms[l] = r.detach().flatten(1).pow(2).mean(1).sqrt()
        grads += list(torch.autograd.grad(value.sum(), [V, c]))
    assert not noises
    return values, rms, grads


def run_train_feedback(net, x, feedback, fb_loss, sigma, dphi=None):
    """One call of train_feedback with its noise draws and optimizer gradients recorded."""
    algo = make_algo("dtp", loss="ce", feedback=feedback, fb_loss=fb_loss, sigma=sigma, fb_iters=1, fb_lr=0.05)
    us, acts = net.forward(x)
    f = us[-1]
    algo.setup(net, acts)
    randomize_feedback(algo, net)
    fbw = {l: (fb.weight.clone(), fb.bias.clone()) for l, fb in algo.fb.items()}
    drawn, passed = [], []
    orig = algo._noise

    def noise(like, s):
        n = orig(like, s)
        drawn.append((tuple(like.shape), s, n.clone()))
        return n
    algo._noise = noise
    algo.fb_opt.step = lambda g: passed.append([t.clone() for t in g])  # record, do not apply
    if dphi is not None:  # a planted wrong phi' (read from phi(z) or from z, whichever the net uses)
        net.dphi = dphi
        net._dphi = lambda u, a=None: dphi(u)
    stats = algo.train_feedback(net, acts, f)
    return algo, fbw, list(acts) + [f], drawn, passed, stats


FB_CASES = [("mlp", fb, loss, 0.1) for fb in ("trainable", "linear") for loss in ("rec", "drl", "ldrl")] + [
    ("mlp", "trainable", "ldrl", [0.1, 0.2, 0.3]),  # per-layer sigma (layers 1..L-1)
    ("mlp", "linear", "drl", [0.3, 0.05, 0.2]),
    ("cnn", "trainable", "ldrl", 0.1),
    ("cnn", "linear", "rec", 0.2),
]


@pytest.mark.parametrize("arch,feedback,fb_loss,sigma", FB_CASES)
def test_feedback_losses_and_gradients(arch, feedback, fb_loss, sigma):
    """fb_loss_l / rec_err_l equal the documented losses on the recorded noise, and the gradients passed to
    the feedback optimizer are autograd's of the batch-mean loss in (V_l, c_l)."""
    net, x, _ = make_net(arch, "tanh", depth=4 if arch == "mlp" else 3, B=5 if arch == "mlp" else 3)
    algo, fbw, h, drawn, passed, stats = run_train_feedback(net, x, feedback, fb_loss, sigma)
    L = net.depth
    # the noise: xi_l on h_{l-1} with sigma_{l-1} (then eta_l on h_l for ldrl), one stream per replica
    per_layer = 2 if fb_loss == "ldrl" else 1
    assert len(drawn) == per_layer * (L - 1) and len(passed) == 1
    for i, l in enumerate(range(2, L + 1)):
        shape, s, xi = drawn[per_layer * i]
        assert shape == tuple(h[l - 1].shape)
        assert s == (sigma if isinstance(sigma, float) else sigma[l - 2])
        assert not torch.equal(xi[0], xi[1])
        if per_layer == 2:
            assert drawn[per_layer * i + 1][0] == tuple(h[l].shape)
    values, rms, grads = fb_loss_oracle(net, algo, fbw, h, [d[2] for d in drawn], feedback, fb_loss)
    for l in range(2, L + 1):
        ok, err = close(stats[f"fb_loss_{l}"], values[l])
        assert ok, (l, err, stats[f"fb_loss_{l}"], values[l])
        ok, err = close(stats[f"rec_err_{l}"], rms[l])
        assert ok, (l, err)
    assert len(passed[0]) == len(grads) == 2 * (L - 1)
    for i, (g, r) in enumerate(zip(passed[0], grads)):
        # linear feedback with drl / ldrl: the bias cancels from the loss, its gradient is 0 up to
        # rounding of O(|grad V|) terms, so it is compared on the scale of its layer's V gradient
        scale = max(r.abs().max(), grads[i - i % 2].abs().max())
        ok, err = close(g, r, scale=scale)
        assert ok, (i, err)
    if feedback == "linear" and fb_loss != "rec":
        assert all(grads[i].abs().max() <= RTOL * grads[i - 1].abs().max() for i in range(1, len(grads), 2))


def test_feedback_loss_oracle_can_fail():
    """Guard: a feedback gradient without phi', or the drl formula in place of ldrl, is caught."""
    net, x, _ = make_net("mlp", "tanh", depth=4)
    algo, fbw, h, drawn, passed, stats = run_train_feedback(net, x, "trainable", "ldrl", 0.1,
                                                           dphi=lambda z: torch.ones_like(z))
    noise = [d[2] for d in drawn]
    values, _, grads = fb_loss_oracle(net, algo, fbw, h, noise, "trainable", "ldrl")
    assert close(stats["fb_loss_2"], values[2])[0]  # the values do not use phi'
    assert not close(passed[0][0], grads[0], rtol=1e-3)[0]
    drl_values, _, _ = fb_loss_oracle(net, algo, fbw, h, noise[0::2], "trainable", "drl")
    assert not close(stats["fb_loss_2"], drl_values[2], rtol=1e-3)[0]


# ----------------------------------------------------------------------------- 5. inverse feedback
def _linear_net():
    return make_net("mlp", "linear", depth=4)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_inverse_feedback_targets_equal_numpy_pinv(loss):
    """Linear net: DTP with inverse feedback gives t_{l-1} = h_{l-1} + pinv(mult W_l) (t_l - h_l)."""
    net, x, y = _linear_net()
    algo = make_algo("dtp", loss=loss, beta=0.7, feedback="inverse")
    algo.step(net, x, y)
    ref = n_targets(algo, net, x, y, loss, 0.7, True, "inverse")
    err = compare_targets(algo._last[2], ref, net.depth)
    assert err <= RTOL, err


def test_inverse_oracle_can_fail():
    """Guard: the pseudo-inverse of W_l without its multiplier gives other targets."""
    net, x, y = _linear_net()
    algo = make_algo("dtp", loss="ce", beta=0.7, feedback="inverse")
    algo.step(net, x, y)
    ref = n_targets(algo, net, x, y, "ce", 0.7, True, "inverse", inv_mult=False)
    assert compare_targets(algo._last[2], ref, net.depth, layers=range(1, net.depth)) > 1e-3


# ----------------------------------------------------------------------------- 6. GNT
def n_gnt_targets(net, x, y, loss, beta, lam):
    out = []
    for k in range(net.K):
        nn = NumpyNet(net, k)
        h, us, f, _ = nn.forward(x[k].numpy())
        d = n_dldf(f, y[k].numpy(), loss)
        L = nn.L
        t = [None] * (L + 1)
        t[L] = f - beta * d
        J = np.broadcast_to(nn.mult[L - 1] * nn.W[L - 1], (f.shape[0], *nn.W[L - 1].shape))  # df/dh_{L-1}
        for l in range(L - 1, 0, -1):
            if l < L - 1:  # df/dh_l = df/dh_{l+1} diag(phi'(u_{l+1})) mult_{l+1} W_{l+1}
                dphi = 1 - np.tanh(us[l + 1]) ** 2
                J = (J * dphi[:, None, :]) @ (nn.mult[l] * nn.W[l])
            step = np.stack([J[b].T @ np.linalg.solve(J[b] @ J[b].T + lam * np.eye(J.shape[1]), d[b])
                             for b in range(J.shape[0])])
            t[l] = h[l] - beta * step
        out.append(t)
    return out


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_gnt_targets_equal_numpy(loss):
    """t_l = h_l - beta J_l^T (J_l J_l^T + lambda I)^{-1} dl/df with J_l = df/dh_l per sample."""
    net, x, y = make_net("mlp", "tanh", depth=4)
    algo = make_algo("gnt", loss=loss, beta=0.7, damping=1e-3)
    algo.step(net, x, y)
    ref = n_gnt_targets(net, x, y, loss, 0.7, 1e-3)
    err = compare_targets(algo._last[2], ref, net.depth)
    assert err <= RTOL, err


def test_gnt_oracle_can_fail():
    """Guard: GNT Jacobians without phi' are caught."""
    net, x, y = make_net("mlp", "tanh", depth=4)
    ref = n_gnt_targets(net, x, y, "ce", 0.7, 1e-3)
    net.linearize = lambda l, u, a=None: (lambda g: g)
    algo = make_algo("gnt", loss="ce", beta=0.7, damping=1e-3)
    algo.step(net, x, y)
    t = algo._last[2]
    assert compare_targets(t, ref, net.depth, layers=[3, 4]) <= RTOL  # J_3 = mult W_4 has no phi'
    assert compare_targets(t, ref, net.depth, layers=[1, 2]) > 1e-4  # J_1, J_2 do
