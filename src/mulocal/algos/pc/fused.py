"""The parallel solver on a plain MLP in few, mostly in-place tensor operations (docs/PERFORMANCE.md).

Taken by ``PC.step`` for parallel inference without FPA, guard, record, tol, momentum or incremental updates on
a plain MLP (``Dense`` layers, no residual layer): the one-hot target built once per training step, the loss
reduced only where it is used, v_l <- v_l - kappa gamma_l e_l + kappa gamma_{l+1} mult J_l (W^T e_{l+1}) as two
in-place updates, predictions and activities written into their buffers, and at F-ini the errors that are
exactly 0 neither computed nor propagated. The moves, gradients, loss and status are ``state.step``'s up to
float rounding (tests/test_pc_fused.py).
"""
from __future__ import annotations

import torch

from ...losses import labels
from ...losses import onehot as one_hot
from ...nets import MLP, Net
from .energy import bcast, energy_from_parts, weight_grads
from .steps import kappas


def applies(pc, net: Net) -> bool:
    """Whether ``PC.step`` takes this path: parallel inference without FPA, guard, record, tol, momentum or
    incremental updates, on a plain MLP (``MLP`` builds Dense layers only; ResMLP, a subclass, is excluded; a user's
    model of Linear units with one elementwise activation between them: ``adapter.ModuleNet.plain_mlp``)."""
    return (pc.mode == "parallel" and not (pc.fpa or pc.guard or pc.record or pc.momentum or pc.incremental)
            and pc.tol is None and (type(net) is MLP or getattr(net, "plain_mlp", False)))


def _top(pc, f: torch.Tensor, onehot: torch.Tensor, lab: torch.Tensor, need_loss: bool = True):
    """(per-sample loss terms (K, B) or None, e_L = -dloss/df) at the output f, with the one-hot target built
    once per training step (``losses.loss_and_grad`` builds it at every call). ``_loss_of`` turns the terms
    into the batch-mean loss per replica, bitwise that of ``loss_and_grad``: the cross-entropy sum over
    classes of logp * onehot is logp[y] exactly, and onehot - p = -(p - onehot) exactly."""
    if pc.loss == "ce":
        logp = torch.log_softmax(f, -1)
        terms = logp.gather(-1, lab).squeeze(-1) if need_loss else None  # log p_y
        return terms, torch.sub(onehot, logp.exp_())
    e_top = torch.sub(onehot, f)
    return (e_top.square().sum(-1) if need_loss else None), e_top

def _loss_of(pc, terms: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss from ``_top``'s terms (the batch is the last dimension; leading ones are kept)."""
    return terms.mean(-1).neg_() if pc.loss == "ce" else 0.5 * terms.mean(-1)

@torch.no_grad()
def step(pc, net: Net, x: torch.Tensor, y: torch.Tensor):
    """Parallel inference and the weight gradients in few, mostly in-place tensor operations: the one-hot
    target built once, the loss only where it is used (the returned feed-forward loss; the status, reduced
    once at the end), the step, gamma_{l+1} and the multiplier folded into one coefficient of an in-place
    move, predictions and activities written into their buffers, the errors that are exactly 0 at F-ini
    neither computed nor propagated, no host synchronisation. The moves are those of ``state.step``; only the rounding differs (tests/test_pc_fused.py)."""
    L, layers = net.depth, net.layers
    gam = pc.energy_weights(net)
    u_ff, a_ff = net.forward(x)
    kap = kappas(pc, gam, net, a_ff)
    f = u_ff[L]
    lab = labels(f, y)
    onehot = one_hot(lab, f.shape[-1], f.dtype)
    lab = lab.unsqueeze(-1)
    status = pc.keep_status
    residual = status and pc.steps > 1
    terms, e_top = _top(pc, f, onehot, lab)
    ff_loss = _loss_of(pc, terms)
    v = [a_ff[0]] + [pc.init_value(u_ff[l], net) for l in range(1, L)]
    a, mu = list(a_ff), [None] + u_ff[1:]
    wt = [None] + [layers[l].weight.transpose(1, 2) for l in range(1, L)]  # W_{l+1}^T, for mu_{l+1}
    bias = [None] + [None if layers[l].bias is None else layers[l].bias.unsqueeze(1) for l in range(1, L)]
    dims = tuple(range(1, f.dim()))  # per replica: every dimension but K
    norms, losses = [], [terms]  # the status: ||e_l|| (l < L) and the loss terms of every state
    if pc.init == "forward":  # F-ini: every hidden error is exactly 0 (None: not computed)
        errs = [None] * L + [e_top]
    else:
        for l in range(1, L):
            a[l] = net.post(l, v[l])
            mu[l + 1] = layers[l].forward(a[l])
        terms, e_top = _top(pc, mu[L], onehot, lab, status)
        errs = [None] + [v[l] - mu[l] for l in range(1, L)] + [e_top]
        losses = [terms]
    if status:
        norms.append([None if errs[l] is None else torch.linalg.vector_norm(errs[l], dim=dims)
                      for l in range(1, L)])
    tanh = net.activation == "tanh"
    one = torch.ones((), dtype=f.dtype, device=f.device) if tanh else None
    kb = [bcast(k, v[1]) if isinstance(k, torch.Tensor) else None for k in kap]

    def back(l):  # (c, J_l^T W_{l+1}^T e_{l+1} / mult, J_l or None): the bracket of dF/dv_l, c = gamma_{l+1} mult
        bw = torch.bmm(errs[l + 1], layers[l].weight)  # the multiplier goes into c
        c = gam[l] * layers[l].mult
        if tanh:
            return c, bw, torch.addcmul(one, a[l], a[l], value=-1.0)  # J = 1 - a^2
        return c, net.linearize(l, v[l], a[l])(bw), None

    def add_sq(total, grad):  # total + ||grad||^2 per replica (None: nothing summed yet)
        sq = grad.square().sum(dims)
        return sq if total is None else total + sq

    def grad_v(l):  # dF/dv_l = gamma_l e_l - gamma_{l+1} J_l^T W_{l+1}^T e_{l+1} (a new tensor), None if 0
        e = errs[l]
        if errs[l + 1] is None:  # F-ini: e_{l+1} = 0 exactly
            return None if e is None else e.mul(gam[l - 1])
        c, jb, J = back(l)
        if J is not None:
            jb = J.mul_(jb)
        if e is None:
            return jb.mul_(-c)
        return torch.add(e, jb, alpha=-c) if gam[l - 1] == 1 else e.mul(gam[l - 1]).sub_(jb, alpha=c)

    g0 = None
    for t in range(pc.steps):
        moved = [False] * (L + 1)
        for l in range(1, L):
            fresh = v[l] is u_ff[l]  # still the feed-forward value (kept for perturbation()): move out of place
            if kb[l - 1] is None and not (residual and t == 0):
                # v_l <- v_l - kappa gamma_l e_l + kappa c J (W^T e_{l+1}): in place, no gradient tensor
                k = kap[l - 1]
                above = back(l) if errs[l + 1] is not None else None  # J_l read at v_l before it moves
                if errs[l] is not None:
                    v[l] = torch.add(v[l], errs[l], alpha=-k * gam[l - 1]) if fresh else \
                        v[l].add_(errs[l], alpha=-k * gam[l - 1])
                    fresh = False
                if above is not None:
                    c, jb, J = above
                    if J is None:
                        v[l] = torch.add(v[l], jb, alpha=k * c) if fresh else v[l].add_(jb, alpha=k * c)
                    else:
                        v[l] = torch.addcmul(v[l], J, jb, value=k * c) if fresh else \
                            v[l].addcmul_(J, jb, value=k * c)
                moved[l] = errs[l] is not None or errs[l + 1] is not None
                continue
            grad = grad_v(l)
            if grad is None:  # dF/dv_l = 0 exactly (F-ini, below the top): v_l stays
                continue
            if residual and t == 0:
                g0 = add_sq(g0, grad)
            if kb[l - 1] is None:
                v[l] = torch.add(v[l], grad, alpha=-kap[l - 1]) if fresh else v[l].add_(grad, alpha=-kap[l - 1])
            else:
                v[l] = torch.addcmul(v[l], kb[l - 1], grad, value=-1.0) if fresh else \
                    v[l].addcmul_(kb[l - 1], grad, value=-1.0)
            moved[l] = True
        for l in range(1, L):
            if not moved[l]:  # a_l and mu_{l+1} unchanged
                continue
            a[l] = torch.tanh(v[l], out=a[l]) if tanh else net.post(l, v[l])
            mult = layers[l].mult
            if mu[l + 1] is u_ff[l + 1]:  # the feed-forward value: a new tensor
                mu[l + 1] = torch.baddbmm(bias[l], a[l], wt[l], alpha=mult) if bias[l] is not None else \
                    torch.bmm(a[l], wt[l])
            elif bias[l] is not None:
                torch.baddbmm(bias[l], a[l], wt[l], alpha=mult, out=mu[l + 1])
            else:
                torch.bmm(a[l], wt[l], out=mu[l + 1])
            if bias[l] is None and mult != 1:
                mu[l + 1].mul_(mult)
        for l in range(1, L):
            if not (moved[l] or moved[l - 1]):  # v_l and mu_l unchanged: e_l too (0 at F-ini)
                continue
            if errs[l] is None:
                errs[l] = v[l] - mu[l]
            else:
                torch.sub(v[l], mu[l], out=errs[l])
        terms, errs[L] = _top(pc, mu[L], onehot, lab, status)
        if status:
            norms.append([None if errs[l] is None else torch.linalg.vector_norm(errs[l], dim=dims)
                          for l in range(1, L)])
            losses.append(terms)
    grads = weight_grads(net, errs, a, gam)  # errs[l] None: e_l = 0 exactly (zero gradients)
    pc._last = (v, u_ff)
    if status:
        g_end = None
        if residual:
            for l in range(1, L):
                grad = grad_v(l)
                if grad is not None:
                    g_end = add_sq(g_end, grad)
        # the per-state parts as _energy_parts lays them out: ||e_l|| (None: exactly 0), then the loss
        zero, rows = torch.zeros_like(losses[0][..., 0]), _loss_of(pc, torch.stack(losses))
        parts = [p for s, n in enumerate(norms) for p in [zero if c is None else c for c in n] + [rows[s]]]
        tr = energy_from_parts(parts, gam, L, f.shape[1])
        pc.status.finish(tr[:-1], tr[1:], f.dtype, g0, g_end, None)  # g0: None unless residual
    return grads, ff_loss
