"""Shared by the oracle tests: the comparison, the activations and the residual net with its PC energy, written
out independently of ``mulocal`` (nothing from it but a net's raw weights and multipliers).

Tolerance: float64 compositions of O(depth x steps) small products on O(1) numbers; rounding is ~1e-15 relative,
so 1e-10 (relative to the reference's largest entry) leaves orders of margin while any equation error (an O(1)
relative change) fails it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RTOL = 1e-10
PHI = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda u: u}


def close(a, b, rtol=RTOL, scale=None):
    """(max |a - b| <= rtol * max |b|, the relative error); ``scale`` replaces max |b| where the reference can be
    ~0 (e.g. a residual at an exact fixed point, a gradient that cancels exactly)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = torch.as_tensor(scale if scale is not None else b.abs().max(), dtype=torch.float64).clamp_min(1e-300)
    return bool((a - b).abs().max() <= rtol * scale), float((a - b).abs().max() / scale)


def _lin(inp, W, b, m):
    """m W inp + b: a dense layer (K, B, n) or a same-padded convolution per replica (K, B, C, h, w)."""
    if inp.dim() == 5:
        out = torch.stack([F.conv2d(inp[k], W[k], None, padding=W.shape[-1] // 2) for k in range(inp.shape[0])]) * m
        return out if b is None else out + b[:, None, :, None, None]
    out = m * torch.einsum("kbi,koi->kbo", inp, W)
    return out if b is None else out + b[:, None, :]


class WrittenResNet:
    """The residual net of depth H (MLP or CNN) and its PC energy, from the raw weights (m_l: the width multiplier,
    a = d^-alpha the branch multiplier from the formula, d = (H - 2) / (H_0 - 2)):

        MLP:  h_1 = m_1 W_1 x + b_1,   h_l = h_{l-1} + a (m_l W_l phi(h_{l-1}) + b_l),   f = m_H W_H phi(h_{H-1}) + b_H
        CNN:  h_1 = m_1 conv(W_1, avgpool_2(x)) + b_1, h_l = h_{l-1} + a (m_l conv(W_l, phi(h_{l-1})) + b_l),
              f = m_H W_H flatten(maxpool_2(phi(h_{H-1}))) + b_H      (F.conv2d per replica, same padding)

        E(v; W) = sum_{l<H} gamma_l / 2 ||v_l - mu_l(v_{l-1})||^2 + gamma_H loss_sum(mu_H(v_{H-1}))

    (mu_l = ``layer(l, .)``; unless ``gammas``: the documented depth rule for the hidden weights, gamma_l = d^g,
    g = ``depth_gamma`` (1 by default; docs/depth.md), and gamma_H = 1, the net's base width)."""

    def __init__(self, net, alpha=0.5, base_depth=3, loss="ce", gammas=None, depth_gamma=1.0):
        self.cnn, self.H = net.kind == "rescnn", net.depth
        self.W = [l.weight.detach().clone() for l in net.layers]
        self.b = [l.bias.detach().clone() if l.bias is not None else None for l in net.layers]
        self.m = [l.rule.multiplier for l in net.layers]  # the width multiplier (tested in test_param)
        self.a = ((self.H - 2) / (base_depth - 2)) ** (-alpha)
        self.phi, self.loss = PHI[net.activation], loss
        d = (self.H - 2) / (base_depth - 2)
        self.gam = gammas if gammas is not None else [d ** depth_gamma] * (self.H - 1) + [1.0]

    def _pool(self, t, fn):
        K, B = t.shape[:2]
        y = fn(t.reshape(K * B, *t.shape[2:]), 2)
        return y.reshape(K, B, *y.shape[1:])

    def layer(self, l, v_prev, W=None, b=None):
        """h_l (the prediction mu_l) from h_{l-1} (the raw input for l = 1)."""
        W = self.W[l - 1] if W is None else W
        b = self.b[l - 1] if b is None else b
        m = self.m[l - 1]
        if l == 1:
            return _lin(self._pool(v_prev, F.avg_pool2d) if self.cnn else v_prev, W, b, m)
        if l == self.H:
            a = self.phi(v_prev)
            a = self._pool(a, F.max_pool2d).flatten(2) if self.cnn else a
            return _lin(a, W, b, m)
        return v_prev + self.a * _lin(self.phi(v_prev), W, b, m)

    def forward(self, x, W=None, b=None):
        W, b = W or self.W, b or self.b
        h = [x]
        for l in range(1, self.H + 1):
            h.append(self.layer(l, h[-1], W[l - 1], b[l - 1]))
        return h

    def loss_sum(self, f, y):
        onehot = F.one_hot(y, f.shape[-1]).to(f.dtype).expand_as(f)
        if self.loss == "ce":
            return -(torch.log_softmax(f, -1) * onehot).sum()
        return 0.5 * (f - onehot).pow(2).sum()

    def E(self, v, y, W=None, b=None):
        W, b = W or self.W, b or self.b
        tot = 0.0
        for l in range(1, self.H):
            tot = tot + 0.5 * self.gam[l - 1] * (v[l] - self.layer(l, v[l - 1], W[l - 1], b[l - 1])).pow(2).sum()
        return tot + self.gam[-1] * self.loss_sum(self.layer(self.H, v[self.H - 1], W[-1], b[-1]), y)

    def dEdv(self, v, y):
        vv = [v[0]] + [t.detach().clone().requires_grad_() for t in v[1:]]
        return [None] + [g.detach() for g in torch.autograd.grad(self.E(vv, y), vv[1:])]

    def infer(self, v, y, T, mode, kappas):
        """T inference moves v_l <- v_l - kappa_l dE/dv_l: sequential (top down, each layer with the values as they
        are) or parallel (every layer from one snapshot)."""
        v = list(v)
        kappas = [k.view(-1, *[1] * (v[1].dim() - 1)) if torch.is_tensor(k) else k for k in kappas]
        for _ in range(T):
            if mode == "sequential":
                for l in range(self.H - 1, 0, -1):
                    v[l] = v[l] - kappas[l - 1] * self.dEdv(v, y)[l]
            else:
                g = self.dEdv(v, y)
                for l in range(1, self.H):
                    v[l] = v[l] - kappas[l - 1] * g[l]
        return v

    def leaves(self):
        W = [w.clone().requires_grad_() for w in self.W]
        b = [t.clone().requires_grad_() if t is not None else None for t in self.b]
        return W, b, [t for pair in zip(W, b) for t in pair if t is not None]


def host_reads(monkeypatch, fn) -> int:
    """How many host read-backs (``.item``, ``.tolist``, ``.cpu``, ``bool`` of a tensor) ``fn()`` makes: each is a
    device synchronisation on a GPU."""
    calls = [0]
    for name in ("item", "tolist", "cpu", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **kw):
            calls[0] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return calls[0]
