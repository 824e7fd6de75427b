"""Autograd oracle for predictive coding: every inference move and weight gradient of ``algos/pc.py``
against its documented rule written with dF/dv of an energy written out here.

The energy of one replica, summed over the batch (the update is its batch mean):

    F(v; W) = sum_{l<L} gamma_l / 2 ||v_l - mu_l(v_{l-1})||^2 + gamma_L loss(mu_L(v_{L-1})),
    mu_l(v) = mult_l W_l phi(v) + b_l   (phi = identity on the input v_0 = x)

Documented rules checked (docs of ``algos/pc.py``):

* sequential inference: for l = L-1 .. 1, v_l <- v_l - kappa_l dF/dv_l at the state *as it is then*;
* parallel inference: every v_l moved with dF/dv_l taken at one snapshot;
* inference momentum: q_l <- m q_l + dF/dv_l, v_l <- v_l - kappa_l q_l;
* the default step: kappa_l = 1/gamma_l (sequential, and any mode under FPA); parallel without FPA
  kappa_l = 1/(gamma_l + gamma_{l+1} c_{l+1} ||W_{l+1}||_2^2) (c = 1 below a hidden layer, 1 for MSE
  and 1/2 for cross-entropy below the output), the norm from an exact SVD here;
* weight gradients: (1/B) dF/dW at the final state;
* FPA: predictions, Jacobians and presynaptic activities frozen at their feed-forward values z = u_ff.
  Written with G(v, z) = sum_{l<L} gamma_l/2 ||v_l - mu_l(z_{l-1})||^2 + gamma_L loss(mu_L(z_{L-1})):
  the move is (dG/dv_l + dG/dz_l) at z = u_ff and the weight gradient (1/B) dG/dW at z = u_ff.

Nothing here calls ``algos/pc.py`` to make an expected value: the MLP energy is written from the raw
weights; the CNN one from the net's layer maps (tested against autograd elsewhere). A last test does
one single-shot SI step by hand in numpy.

Tolerance: every quantity is a float64 composition of O(L T) matrix products of size <= 16 on O(1)
numbers; rounding is ~1e-15 relative per product, so agreement to 1e-10 relative (the bound this
file uses) leaves five orders of margin and any equation error (O(1) relative) fails it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mulocal.algos import make_algo
from mulocal.nets import build
from mulocal.param import preset
from oracles import RTOL, close


# ----------------------------------------------------------------------------- the oracle
class Energy:
    """The PC energy of a net, written independently of the learning rule."""

    def __init__(self, net, loss: str, gammas: list[float], raw: bool = True):
        self.net, self.loss, self.gam, self.raw = net, loss, gammas, raw
        self.L = net.depth
        self.W = [layer.weight.detach().clone() for layer in net.layers]
        self.b = [layer.bias.detach().clone() if layer.bias is not None else None for layer in net.layers]
        self.mult = [layer.mult for layer in net.layers]
        act = net.activation
        self.phi = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda u: u}[act]

    def mu(self, l: int, v_prev: torch.Tensor, W=None, b=None) -> torch.Tensor:
        """Prediction of layer l (1-based) from the value (or input) below."""
        W = self.W[l - 1] if W is None else W
        b = self.b[l - 1] if b is None else b
        if not self.raw:  # CNN: the net's own layer maps (post = phi, pooling, flattening)
            a = self.net.post(l - 1, v_prev)
            return self.net.layers[l - 1].forward(a, weight=W, bias=b if b is not None else False)
        a = v_prev.flatten(2) if l == 1 else self.phi(v_prev)
        out = self.mult[l - 1] * torch.einsum("kbi,koi->kbo", a, W)
        return out if b is None else out + b[:, None, :]

    def loss_sum(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed over the batch and the replicas."""
        onehot = torch.nn.functional.one_hot(y, f.shape[-1]).to(f.dtype).expand_as(f)
        if self.loss == "ce":
            return -(torch.log_softmax(f, -1) * onehot).sum()
        return 0.5 * (f - onehot).pow(2).sum()

    def F(self, v, y, W=None, b=None, z=None):
        """F(v) (z is None) or the FPA energy G(v, z)."""
        W = W or self.W
        b = b or self.b
        src = v if z is None else z
        tot = 0.0
        for l in range(1, self.L):
            tot = tot + 0.5 * self.gam[l - 1] * (v[l] - self.mu(l, src[l - 1], W[l - 1], b[l - 1])).pow(2).sum()
        return tot + self.gam[-1] * self.loss_sum(self.mu(self.L, src[self.L - 1], W[-1], b[-1]), y)

    def feedforward(self, x):
        u = [x]
        for l in range(1, self.L):
            u.append(self.mu(l, u[-1]))
        return u

    def dFdv(self, v, y, z=None):
        """[None, dF/dv_1, ..., dF/dv_{L-1}] (FPA: dG/dv_l + dG/dz_l at z)."""
        vv = [v[0]] + [t.detach().clone().requires_grad_() for t in v[1:]]
        if z is None:
            grads = torch.autograd.grad(self.F(vv, y), vv[1:])
        else:
            zz = [z[0]] + [t.detach().clone().requires_grad_() for t in z[1:]]
            out = torch.autograd.grad(self.F(vv, y, z=zz), vv[1:] + zz[1:])
            n = self.L - 1
            grads = [out[i] + out[n + i] for i in range(n)]
        return [None] + [g.detach() for g in grads]

    def infer(self, v, y, T, mode, kappas, fpa, momentum=0.0, z=None, trace=None):
        """T steps of the documented move; a kappa is a number or a (K,) tensor (one per replica)."""
        v = list(v)
        kappas = [k.view(-1, *([1] * (v[l + 1].dim() - 1))) if torch.is_tensor(k) else k
                  for l, k in enumerate(kappas)]
        vel = [None] + [torch.zeros_like(t) for t in v[1:]]
        for _ in range(T):
            if mode == "sequential":
                for l in range(self.L - 1, 0, -1):
                    g = self.dFdv(v, y, z if fpa else None)[l]
                    vel[l] = momentum * vel[l] + g
                    v[l] = v[l] - kappas[l - 1] * vel[l]
            else:
                g = self.dFdv(v, y, z if fpa else None)
                for l in range(1, self.L):
                    vel[l] = momentum * vel[l] + g[l]
                    v[l] = v[l] - kappas[l - 1] * vel[l]
            if trace is not None:
                trace.append(self.layer_energies(v, y, z if fpa else None))
        return v

    def weight_grads(self, v, y, B, z=None):
        W = [w.clone().requires_grad_() for w in self.W]
        b = [t.clone().requires_grad_() if t is not None else None for t in self.b]
        leaves = [t for pair in zip(W, b) for t in pair if t is not None]
        out = torch.autograd.grad(self.F(v, y, W, b, z=z), leaves)
        return [g / B for g in out]

    def layer_energies(self, v, y, z=None):
        """(L, K): gamma_l / 2 mean_batch ||e_l||^2 and gamma_L mean_batch loss, per replica."""
        src = v if z is None else z
        rows = []
        for l in range(1, self.L):
            e = v[l] - self.mu(l, src[l - 1])
            rows.append(0.5 * self.gam[l - 1] * e.flatten(2).pow(2).sum(-1).mean(-1))
        f = self.mu(self.L, src[self.L - 1])
        per = torch.stack([self.loss_sum(f[k:k + 1], y) for k in range(f.shape[0])]) / f.shape[1]
        rows.append(self.gam[-1] * per)
        return torch.stack(rows).detach()


def operator_norms_sq(net, x):
    """||W_l||_2^2 per layer l = 2..L and replica (list of (K,)), from an exact SVD of the matrix of the
    linear map the layer applies to the activity below (MLP: mult_l W_l; CNN: the matrix of the net's
    own layer map, read off by applying it to every basis vector)."""
    acts = [net.post(0, x) if net.kind == "mlp" else x]
    out = []
    for l in range(1, net.depth):
        acts.append(net.post(l, net.layers[l - 1].forward(acts[-1])))
        layer = net.layers[l]
        if net.kind == "mlp":
            mats = layer.mult * layer.weight
        else:
            shape = acts[l].shape[2:]
            n = int(np.prod(shape))
            basis = torch.eye(n, dtype=torch.float64).reshape(1, n, *shape).expand(net.K, n, *shape).contiguous()
            mats = layer.forward(basis, bias=False).reshape(net.K, n, -1).transpose(1, 2)
        out.append(torch.linalg.matrix_norm(mats, ord=2) ** 2)
    return out


def documented_default_kappas(net, loss, mode, fpa, gam, x):
    """The documented default inference step (docs/pc.md): 1/gamma_l for sequential inference and under
    FPA; for parallel inference without FPA 1/(gamma_l + gamma_{l+1} c_{l+1} ||W_{l+1}||_2^2), c = 1 for a
    hidden layer above, the loss curvature bound for the output (MSE 1, cross-entropy 1/2)."""
    L = net.depth
    if mode == "sequential" or fpa:
        return [1.0 / g for g in gam[:-1]]
    s2 = operator_norms_sq(net, x)
    c = [1.0] * (L - 2) + [{"mse": 1.0, "ce": 0.5}[loss]]
    return [1.0 / (gam[l - 1] + gam[l] * c[l - 1] * s2[l - 1]) for l in range(1, L)]  # (K,) each


# ----------------------------------------------------------------------------- set-up
def _net(arch="mlp", act="tanh", gbar=0.0, depth=4, K=2, bias=True):
    """A small float64 net away from its base width, with multipliers != 1 and non-zero biases."""
    p = preset("mup", "sgd", gamma_bar_L=gbar, base_width=4).with_(a=(0.0, 0.25, 0.5))
    shape = (1, 8, 8) if arch == "cnn" else (7,)
    width = 5 if arch == "cnn" else 12
    net = build(arch, shape, 5, width, p, depth=3 if arch == "cnn" else depth, activation=act, K=K,
                seeds=[3 + k for k in range(K)], bias=bias, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in net.layers:
            if layer.bias is not None:
                layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(K, 6, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=gen)
    return net, x, y


def _initial_values(algo, init, oracle, x, z_ff):
    """The values inference starts from: F-ini, zeros, or the random draw the rule made (recorded)."""
    if init == "forward":
        return [x] + [t.clone() for t in z_ff[1:]]
    if init == "zero":
        return [x] + [torch.zeros_like(t) for t in z_ff[1:]]
    return [x] + algo._drawn


def _spy_random_init(algo):
    """Record the random initial values the rule draws (the oracle starts from the same point)."""
    algo._drawn = []
    orig = algo.init_value

    def spy(u, net):
        out = orig(u, net)
        algo._drawn.append(out.clone())
        return out
    algo.init_value = spy


CASES = [
    # (arch, act, loss, mode, T, init, fpa, gbar, gammas, kappa, momentum)
    ("mlp", "tanh", "ce", "sequential", 1, "forward", False, 0.0, None, None, 0.0),  # the paper's main setting
    ("mlp", "tanh", "ce", "sequential", 1, "forward", False, 1.0, None, None, 0.0),
    ("mlp", "tanh", "ce", "sequential", 1, "forward", False, -1.0, None, None, 0.0),
    ("mlp", "tanh", "ce", "sequential", 3, "forward", False, -1.0, (1.0, 2.5, 0.5), None, 0.0),
    ("mlp", "tanh", "mse", "sequential", 3, "zero", False, 1.0, None, 0.3, 0.0),
    ("mlp", "relu", "ce", "sequential", 3, "random", False, 0.0, None, (0.2, 0.4, 0.3), 0.0),
    ("mlp", "linear", "mse", "sequential", 3, "forward", False, -1.0, (2.0, 1.0, 0.5), None, 0.0),
    ("mlp", "tanh", "ce", "sequential", 3, "forward", True, 1.0, (1.0, 2.5, 0.5), None, 0.0),
    ("mlp", "tanh", "ce", "sequential", 3, "random", True, 0.0, None, 0.25, 0.0),
    ("mlp", "tanh", "ce", "parallel", 1, "forward", False, 0.0, None, None, 0.0),
    ("mlp", "tanh", "ce", "parallel", 3, "forward", False, 1.0, (1.0, 2.5, 0.5), 0.2, 0.0),
    ("mlp", "relu", "mse", "parallel", 3, "zero", False, -1.0, None, None, 0.0),
    ("mlp", "linear", "ce", "parallel", 3, "random", False, 0.0, (0.5, 1.0, 2.0), None, 0.0),
    ("mlp", "tanh", "mse", "parallel", 3, "forward", True, -1.0, None, 0.3, 0.0),
    ("mlp", "tanh", "ce", "parallel", 3, "zero", True, 1.0, None, None, 0.0),
    ("mlp", "tanh", "ce", "sequential", 3, "zero", False, 0.0, None, 0.2, 0.5),  # inference momentum
    ("mlp", "tanh", "ce", "parallel", 3, "forward", False, -1.0, None, 0.2, 0.5),
    ("cnn", "tanh", "ce", "sequential", 3, "forward", False, 1.0, None, None, 0.0),
    ("cnn", "tanh", "mse", "parallel", 3, "zero", True, -1.0, None, 0.3, 0.0),
    # parallel inference with its default step (the curvature bound) and hidden gammas, MSE. On these small
    # MLPs the rule's power-iteration estimate of ||W||_2 has converged to rounding (top-eigenvalue gaps
    # >= 15%); the CNN's default step is checked against the exact norm in test_pc_inference.py.
    ("mlp", "tanh", "mse", "parallel", 3, "forward", False, -1.0, (1.0, 2.5, 0.5), None, 0.0),
]


def _ids(c):
    return "-".join(str(v) for v in c).replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_pc_inference_and_weight_gradients_equal_energy_oracle(case):
    arch, act, loss, mode, T, init, fpa, gbar, gammas, kappa, momentum = case
    net, x, y = _net(arch, act, gbar)
    L = net.depth
    m = net.width / net.param.base_width
    gam = (list(gammas) if gammas else [1.0] * (L - 1)) + [m ** -gbar]  # gamma_L = m^-gbar (gamma'_L = 1)
    if kappa is None:
        kappas = documented_default_kappas(net, loss, mode, fpa, gam, x)
    elif isinstance(kappa, tuple):
        kappas = list(kappa)
    else:
        kappas = [kappa] * (L - 1)
    algo = make_algo("pc", loss=loss, T=T, inference=mode, init=init, fpa=fpa, gammas=gammas, kappa=kappa,
                     momentum=momentum, record=True)
    if init == "random":
        _spy_random_init(algo)
    grads, ff_loss = algo.step(net, x, y)

    oracle = Energy(net, loss, gam, raw=arch == "mlp")
    x0 = net.post(0, x) if arch == "mlp" else x
    z_ff = oracle.feedforward(x0)
    v0 = _initial_values(algo, init, oracle, x0, z_ff)
    trace = [oracle.layer_energies(v0, y, z_ff if fpa else None)]
    v = oracle.infer(v0, y, T, mode, kappas, fpa, momentum, z=z_ff, trace=trace)

    v_code, u_ff = algo._last
    for l in range(1, L):
        ok, err = close(u_ff[l], z_ff[l])
        assert ok, f"feed-forward value of layer {l}: rel err {err:.2e}"
        ok, err = close(v_code[l], v[l])
        assert ok, f"v_{l} after {T} {mode} steps: rel err {err:.2e}"
    ref = oracle.weight_grads(v, y, x.shape[1], z=z_ff if fpa else None)
    assert len(grads) == len(ref)
    for i, (g, r) in enumerate(zip(grads, ref)):
        ok, err = close(g, r)
        assert ok, f"weight gradient {i} ({net.param_info()[i]}): rel err {err:.2e}"
    # the recorded per-layer energies after every step, and the final residual, are those of the oracle
    ok, err = close(algo.stats["energy"], torch.stack(trace))
    assert ok, f"recorded energies: rel err {err:.2e}"
    def rms(d):
        return torch.sqrt(sum(d[l].flatten(1).pow(2).sum(1) for l in range(1, L)) / sum(d[l][0].numel()
                                                                                           for l in range(1, L)))
    r0 = rms(oracle.dFdv(v0, y, z_ff if fpa else None)).max()  # FPA + SI can end at an exact fixed point
    ok, err = close(algo.stats["residual"], rms(oracle.dFdv(v, y, z_ff if fpa else None)), scale=r0)
    assert ok, f"inference residual: rel err {err:.2e}"
    assert torch.allclose(ff_loss, oracle.layer_energies(z_ff, y)[-1] / gam[-1], rtol=RTOL)


def test_energy_oracle_can_fail():
    """Guard: the oracle tells the documented rule from realistic mistakes (stale prediction in SI,
    parallel for sequential, a dropped gamma_L)."""
    net, x, y = _net("mlp", "tanh", 1.0)
    gam = [1.0, 1.0, 1.0, 3.0 ** -1]
    oracle = Energy(net, "ce", gam)
    x0 = net.post(0, x)
    z = oracle.feedforward(x0)
    algo = make_algo("pc", T=1)
    algo.step(net, x, y)
    v_seq = oracle.infer([x0] + z[1:], y, 1, "sequential", [1.0] * 3, False)
    v_par = oracle.infer([x0] + z[1:], y, 1, "parallel", [1.0] * 3, False)
    assert close(algo._last[0][1], v_seq[1])[0] and not close(algo._last[0][1], v_par[1])[0]
    wrong = Energy(net, "ce", gam[:-1] + [1.0])
    v_wrong = wrong.infer([x0] + z[1:], y, 1, "sequential", [1.0] * 3, False)
    assert not close(algo._last[0][3], v_wrong[3])[0]


# ----------------------------------------------------------------------------- numpy by hand
def test_single_shot_si_without_fpa_by_hand_in_numpy():
    """The paper's main PC setting, one step, 2 hidden layers, tanh, cross-entropy, F-ini, T = 1,
    kappa_l = 1/gamma_l = 1, gamma_L = m^-gbar: computed line by line in numpy."""
    gbar = 1.0
    net, x, y = _net("mlp", "tanh", gbar, depth=3)
    grads, _ = make_algo("pc", loss="ce", T=1, inference="sequential", fpa=False).step(net, x, y)
    gL = (net.width / net.param.base_width) ** -gbar
    for k in range(net.K):
        W = [layer.weight[k].numpy() for layer in net.layers]
        b = [layer.bias[k].numpy() for layer in net.layers]
        c = [layer.mult for layer in net.layers]
        X, Y = x[k].numpy(), np.eye(5)[y.numpy()]
        B = X.shape[0]

        def softmax(f):
            e = np.exp(f - f.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        # feed-forward (F-ini: v_l = mu_l)
        v1 = c[0] * X @ W[0].T + b[0]
        mu2 = c[1] * np.tanh(v1) @ W[1].T + b[1]
        v2 = mu2.copy()
        mu3 = c[2] * np.tanh(v2) @ W[2].T + b[2]
        # v2 first (top-down): e2 = 0, e3 = -(softmax - onehot)
        e3 = -(softmax(mu3) - Y)
        dF_dv2 = 1.0 * (v2 - mu2) - gL * (1 - np.tanh(v2) ** 2) * (c[2] * e3 @ W[2])
        v2 = v2 - 1.0 * dF_dv2
        # v1 sees the moved v2; mu2 is still the prediction from the unmoved v1
        e2 = v2 - mu2
        dF_dv1 = 1.0 * (v1 - v1) - 1.0 * (1 - np.tanh(v1) ** 2) * (c[1] * e2 @ W[1])
        v1 = v1 - 1.0 * dF_dv1
        # errors at the final state
        mu1 = c[0] * X @ W[0].T + b[0]
        mu2 = c[1] * np.tanh(v1) @ W[1].T + b[1]
        mu3 = c[2] * np.tanh(v2) @ W[2].T + b[2]
        e1, e2, e3 = v1 - mu1, v2 - mu2, -(softmax(mu3) - Y)
        # grad W_l = -gamma_l mean_b(e_l a_{l-1}^T) * mult_l
        expect = [-c[0] * e1.T @ X / B, -e1.mean(0),
                  -c[1] * e2.T @ np.tanh(v1) / B, -e2.mean(0),
                  -gL * c[2] * e3.T @ np.tanh(v2) / B, -gL * e3.mean(0)]
        for i, (g, e) in enumerate(zip(grads, expect)):
            ok, err = close(g[k], torch.from_numpy(e))
            assert ok, f"replica {k}, tensor {i}: rel err {err:.2e}"


@pytest.mark.parametrize("mode,init,fpa", [("parallel", "forward", False), ("sequential", "zero", False),
                                           ("sequential", "forward", False), ("parallel", "zero", True)])
def test_status_residual_is_the_relative_gradient_norm_of_the_oracle(mode, init, fpa):
    """inference_status()["residual"] = ||dF/dv(v_T)|| / ||dF/dv(v_0)|| (all hidden layers, the batch), per
    replica, with dF/dv from the written-out energy."""
    net, x, y = _net("mlp", "tanh", 1.0)
    gam = [1.0, 1.0, 1.0, 3.0 ** -1]
    algo = make_algo("pc", T=3, inference=mode, init=init, fpa=fpa, kappa=0.3)
    algo.step(net, x, y)
    status = algo.inference_status()
    oracle = Energy(net, "ce", gam)
    x0 = net.post(0, x)
    z = oracle.feedforward(x0)
    v0 = _initial_values(algo, init, oracle, x0, z)
    v = oracle.infer(v0, y, 3, mode, [0.3] * 3, fpa, z=z)

    def sq(d):
        return sum(d[l].flatten(1).pow(2).sum(1) for l in range(1, 4))
    ratio = (sq(oracle.dFdv(v, y, z if fpa else None)) / sq(oracle.dFdv(v0, y, z if fpa else None))).sqrt()
    ok, err = close(torch.tensor(status["residual"], dtype=torch.float64), ratio)
    assert ok, f"status residual: rel err {err:.2e}"
