"""The PC energy and its exact gradients, written once for every net and solver (docs/pc.md, "What the rule computes").

    e_l = v_l - mu_l(v_{l-1})  (l < L),   e_L = -dloss/df,   f = mu_L(v_{L-1})
    F   = sum_{l<L} gamma_l / 2 ||e_l||^2 + gamma_L loss(f)            (per sample; batch means below)
    dF/dv_l = gamma_l e_l - gamma_{l+1} (d mu_{l+1} / d v_l)^T e_{l+1}
    grad W_l = -gamma_l mean_batch(e_l post(v_{l-1})^T)                (the layer's ``grads``: its multiplier)

``mu_l`` is ``Net.predict`` (a residual layer adds v_{l-1}); ``(d mu_{l+1}/d v_l)^T`` is :func:`back`.
"""
from __future__ import annotations

import torch

from ...nets import Net


def back(net: Net, l: int, jac, e_above: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(d mu_{l+1} / d v_l)^T e_{l+1} = J_l^T W_{l+1}^T e_{l+1}, plus e_{l+1} when layer l+1 is residual (``a`` =
    a_l, the input of layer l+1: a layer that is not linear in its input, ``adapter.ModuleLayer``, reads it)."""
    g = jac(net.layers[l].backward_input(e_above, a))
    return g + e_above if net.residual(l + 1) else g


def bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-replica (K,) tensor shaped to broadcast against ``like`` (K, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def errors(v, mu, e_top, L, lo: int = 1) -> list:
    """[None, e_1, ..., e_{L-1}, e_L]: e_l = v_l - mu_l below the top, e_L given; e_l for l < ``lo`` is known to be
    exactly 0 (v_l = mu_l, PC's parallel wavefront from F-ini) and left None."""
    return [None] * lo + [v[l] - mu[l] for l in range(lo, L)] + [e_top]


def weight_grads(net: Net, errs, acts, gam) -> list:
    """grad W_l = -gamma_l mean_batch(e_l a_{l-1}^T), grad b_l = -gamma_l mean_batch(e_l), aligned with
    ``net.params()``: the weight gradient at a solver's final state, for every solver. ``errs[l]`` None means
    e_l = 0 exactly (zero gradients)."""
    grads: list = []
    for l in range(1, net.depth + 1):
        layer = net.layers[l - 1]
        if errs[l] is None:
            grads += [torch.zeros_like(t) for t in layer.tensors()]
        else:
            grads += layer.param_grads(errs[l].mul(-gam[l - 1]), acts[l - 1])
    return grads


def jac_at(net: Net, jacs, l: int, v, a):
    """J_l at v_l: ``jacs[l]`` where built (with a_l by ``Net.post_lin``, or FPA's frozen one), else linearized now."""
    return jacs[l] if jacs is not None and jacs[l] is not None else net.linearize(l, v[l], a[l])


def dF_dv(e, b, g_own, g_above) -> torch.Tensor:
    """dF/dv_l = gamma_l e_l - gamma_{l+1} b (a new tensor), b = (d mu_{l+1}/d v_l)^T e_{l+1}; e None: e_l = 0 exactly
    (up to the sign of a zero, what 0 * gamma_l - gamma_{l+1} b gives); gamma_l = 1: no multiplication by it."""
    if e is None:
        return b.mul(-g_above)
    if g_own == 1:
        return torch.sub(e, b, alpha=g_above)
    return e.mul(g_own).sub_(b, alpha=g_above)


def grad_sq(net: Net, errs, v, a, gam, jacs=None) -> torch.Tensor:
    """sum_l ||dF/dv_l||^2 over the hidden layers and the batch, per replica (K,), at the state (v, a) whose
    errors are ``errs`` (None entries: exactly 0, a leading run as ``errors`` leaves them) (``jacs``: see
    :func:`jac_at`)."""
    tot = 0
    for l in range(1, net.depth):
        if errs[l + 1] is None:  # then e_l = 0 too (a leading run): dF/dv_l = 0
            continue
        b = back(net, l, jac_at(net, jacs, l, v, a), errs[l + 1], a[l])
        tot = tot + dF_dv(errs[l], b, gam[l - 1], gam[l]).flatten(1).pow(2).sum(1)
    return tot


def energy_parts(v, mu, errs, loss, L, start: bool = False) -> list:
    """[||e_1||, ..., ||e_{L-1}||, loss] per replica ((K,) each; norms over the batch and features; ``errs``: the
    errors, None entries exactly 0, or None: v - mu)."""
    if start:  # F-ini: every hidden error is exactly 0
        return [torch.zeros_like(loss)] * (L - 1) + [loss]
    es = [errs[l] if errs is not None else v[l] - mu[l] for l in range(1, L)]
    return [torch.zeros_like(loss) if e is None else torch.linalg.vector_norm(e.flatten(1), dim=1) for e in es] + [loss]


def energy_from_parts(parts: list, gam, L, B) -> torch.Tensor:
    """F = sum_l gamma_l/2 mean_batch ||e_l||^2 + gamma_L loss, (n_states, K) float64, for the states whose
    :func:`energy_parts` were concatenated."""
    x = torch.stack(parts).double().view(-1, L, parts[0].shape[0])
    out = gam[-1] * x[:, -1]
    for l in range(1, L):  # Python-number coefficients: no host-to-device copy
        out = out + x[:, l - 1].square() * (0.5 * gam[l - 1] / B)
    return out


def total_energy(v, mu, errs, loss, gam, L, start: bool = False) -> torch.Tensor:
    """F per replica (K,), float64, on the device, in few operations."""
    out = loss.double() * gam[-1]
    if start:
        return out
    B = v[1].shape[1]
    for l in range(1, L):
        e = errs[l] if errs is not None else v[l] - mu[l]
        if e is None:  # exactly 0
            continue
        out = out + torch.linalg.vector_norm(e.flatten(1), dim=1).double().square() * (0.5 * gam[l - 1] / B)
    return out


def energy_terms(v, mu, loss, gam, L, start: bool = False) -> torch.Tensor:
    """Per-layer terms (L, K): gamma_l/2 mean_batch ||e_l||^2 and gamma_L loss (``start``: at F-ini)."""
    if start:
        return torch.stack([torch.zeros_like(loss)] * (L - 1) + [gam[-1] * loss])
    rows = [0.5 * gam[l - 1] * (v[l] - mu[l]).flatten(2).pow(2).sum(-1).mean(-1) for l in range(1, L)]
    rows.append(gam[-1] * loss)
    return torch.stack(rows)


def state_energy(v, mu, errs, loss, gam, L, record: bool, start: bool = False):
    """(per-layer terms (L, K) when recording, else None; F per replica (K,), float64)."""
    if record:
        terms = energy_terms(v, mu, loss, gam, L, start=start)
        return terms, terms.double().sum(0)
    return None, total_energy(v, mu, errs, loss, gam, L, start=start)
