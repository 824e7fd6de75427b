"""The error solver (ePC, Goemaere et al. 2026, with local messages): the errors are the free variables.

States follow from the errors through the forward map, s_0 = x, s_l = mu_l(s_{l-1}) + e_l (l < L), f = mu_L(s_{L-1}),
so the energy is a function of the errors alone,

    E(e) = sum_{l<L} gamma_l / 2 ||e_l||^2 + gamma_L loss(f(e)),
    dE/de_l = gamma_l (e_l - G_l),   G_l = u_l / gamma_l,   u_L = gamma_L e_L = -gamma_L dloss/df,
    u_l = (d mu_{l+1} / d s_l)^T u_{l+1}                      (energy.back: the backward recursion)

(u_l = -gamma_L dloss/ds_l, the output error carried down through the current states by local messages, one W^T
product per layer, no autograd across layers). The stationarity condition e_l = G_l is the state-based one,
gamma_l e_l = gamma_{l+1} (d mu_{l+1}/d s_l)^T e_{l+1}. A step is a preconditioned gradient step on E,

    e_l <- e_l - kappa_l dE/de_l = e_l + kappa_l gamma_l (G_l - e_l)      (default kappa_l = 1/gamma_l: e_l <- G_l)

followed by the forward map. From F-ini (e = 0) the first step gives e_l = (gamma_L / gamma_l) delta_l^BP. The
preconditioned Hessian is I + (gamma_L / gamma) J^T H_loss J, whose eigenvalues past 1 are those of Theorem 4.2's
C = sum_l (gamma_L / gamma_l) J_l J_l^T (times the loss curvature): the full step contracts the residual by about
lambda(H_loss C) per step (O(gamma_L / M) under muP, Theta(1) in depth with ``Parameterization.gamma_hidden``),
whatever the depth, where state-based steps diffuse the signal one layer per step. The guard halves a replica's
step where the energy rose (per replica, ``torch.where``; no host read).

Status: the energy after every step (from ||e_l|| and the loss the forward map computes anyway) and the relative
residual in the state coordinates, ||dF/dv(s_T)|| / ||dF/dv(s_0)||, as every solver reports it.
"""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ...losses import loss_and_grad
from ...nets import Net
from .energy import back, bcast, energy_from_parts, energy_parts, grad_sq, weight_grads
from .observers import restore
from .steps import kappas


def state_only(options: dict) -> list[str]:
    """The options given in ``options`` (a rule's constructor arguments) that belong to state-based inference:
    the error solver starts from F-ini (e = 0) and moves no values."""
    return [name for name, on in (("fpa", options.get("fpa")), ("init != forward", options.get("init", "forward")
                                  != "forward"), ("momentum", options.get("momentum")),
                                  ("tol", options.get("tol") is not None), ("incremental", options.get("incremental")))
            if on]


def check(options: dict) -> None:
    """Refuse the options of state-based inference (``state_only``), in one line."""
    bad = state_only(options)
    if bad:
        raise ConfigError(f"the error solver starts from F-ini (e = 0) and takes no {', '.join(bad)}: use "
                          f"inference sequential or parallel for those")


@torch.no_grad()
def step(pc, net: Net, x: torch.Tensor, y: torch.Tensor):
    """``pc.steps`` error steps from F-ini, then the weight gradients at the final state (``energy.weight_grads``:
    grad W_l = -gamma_l mean_batch(e_l phi(s_{l-1})^T), e_L = -dloss/df at the final f). Returns (grads, the
    feed-forward loss (K,))."""
    L = net.depth
    gam = pc.energy_weights(net)
    theta = [k * g for k, g in zip(kappas(pc, gam), gam)]  # kappa_l gamma_l: 1 at the default step
    s, a = net.forward(x)
    u_ff = list(s)
    s, a = list(s), list(a)
    ff_loss, dldf = loss_and_grad(s[L], y, pc.loss)
    loss = ff_loss
    e = [None] * L + [dldf.neg_()]  # e[l] None: exactly 0 (F-ini); the guard keeps tensors to put back
    if pc.guard:
        e[1:L] = [torch.zeros_like(s[l]) for l in range(1, L)]
    K, dev = net.K, s[1].device
    track = pc.keep_status or pc.guard or pc.record
    parts = energy_parts(None, None, None, loss, L, start=True) if track else None
    scale = torch.ones(K, dtype=s[1].dtype, device=dev) if pc.guard else None
    backtracks = torch.zeros(K, dtype=torch.float64, device=dev) if pc.guard else None
    energy = energy_from_parts(parts, gam, L, s[1].shape[1])[0] if pc.guard else None
    g0 = None
    for t in range(pc.steps):
        if pc.guard:
            saved = (list(e), list(s), list(a), loss)
        u = e[L].mul(gam[L - 1])
        for l in range(L - 1, 0, -1):  # u_l = (d mu_{l+1}/d s_l)^T u_{l+1} at the current states
            u = back(net, l, net.linearize(l, s[l], a[l]), u, a[l])
            if track and t == 0 and l == L - 1:  # F-ini: dF/dv = 0 below the top, -u_{L-1} there
                g0 = u.flatten(1).pow(2).sum(1)
            # e_l <- e_l + kappa_l gamma_l (G_l - e_l), G_l = u_l / gamma_l (e_l None: 0, and no guard)
            if e[l] is None:
                e[l] = u.mul(theta[l - 1] / gam[l - 1])
            else:
                th = theta[l - 1] if scale is None else bcast(scale * theta[l - 1], u)
                e[l] = torch.lerp(e[l], u if gam[l - 1] == 1 else u.div(gam[l - 1]), th)
        for l in range(1, L):  # the forward map: s_l = mu_l(s_{l-1}) + e_l
            s[l] = net.predict(l, a[l - 1], s[l - 1]) + e[l]
            a[l] = net.post(l, s[l])
        s[L] = net.predict(L, a[L - 1], s[L - 1])
        loss, dldf = loss_and_grad(s[L], y, pc.loss)
        e[L] = dldf.neg_()
        if track:
            new_parts = energy_parts(None, None, e, loss, L)
            if pc.guard:  # undo every replica whose energy did not decrease (nan included), halve its step
                new = energy_from_parts(new_parts, gam, L, s[1].shape[1])[0]
                undo = ~(new <= energy)
                e, s, a, loss = restore(undo, (e, s, a, loss), saved)
                new_parts = [torch.where(undo, p0, p1) for p0, p1 in zip(parts[-L:], new_parts)]
                energy = torch.where(undo, energy, new)
                scale = torch.where(undo, scale * 0.5, scale)
                backtracks += undo
            parts += new_parts
    grads = weight_grads(net, e, a, gam)
    pc._last = (s, u_ff)
    if track:
        g_end = grad_sq(net, e, s, a, gam)
        tr = energy_from_parts(parts, gam, L, s[1].shape[1])
        if pc.keep_status:
            pc.status.finish(tr[:-1], tr[1:], s[1].dtype, g0, g_end, backtracks)
        if pc.record:
            n = sum(s[l][0].numel() for l in range(1, L))
            pc.stats = {"energy": tr.cpu(), "steps": pc.steps, "residual": (g_end / n).sqrt().double().cpu(),
                        "relative_residual": (g_end.double() / g0.double().clamp_min(1e-300)).sqrt().cpu(),
                        "perturbation": pc.perturbation()}
            if pc.guard:
                pc.stats["step_scale"] = scale.double().cpu()
    return grads, ff_loss
