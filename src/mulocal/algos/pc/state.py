"""The state-based solver: inference on the values v_l by (preconditioned) gradient steps on F (docs/pc.md).

    v_l <- v_l - kappa_l dF/dv_l,   dF/dv_l = gamma_l e_l - gamma_{l+1} (d mu_{l+1} / d v_l)^T e_{l+1}

``sequential`` (SI): top-down, each layer with the freshest values above; ``parallel``: all layers from one
snapshot (on a plain MLP without the general path's options, ``fused.step`` computes the same moves in fewer
operations). Options handled here: FPA (mu_l, J_l and the presynaptic activities frozen at their feed-forward
values), momentum, incremental updates (the weights after every inference step), the energy guard, record and
the early stop on the relative energy change. The identity F-ini + FPA + SI + T = 1 + kappa_l = 1/gamma_l gives
e_l = (gamma_L/gamma_l) delta_l^BP and gamma_L times the BP gradient (tested).

Two shortcuts, exact (``SHORTCUTS``; tests/test_pc_fastpath.py compares with them off): each post and its
linearization come from one evaluation (``Net.post_lin``: a pooled post is not recomputed inside the vjp that
linearizes it), kept while v_l is (not under the guard, whose undo mixes replicas' states); and parallel inference
from F-ini runs the wavefront (``front``): every hidden error starts exactly 0, so step t moves only the layers the
top's error has reached, recomputes only their predictions and propagates only nonzero errors.
"""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ...losses import loss_and_grad
from ...nets import Net
from .energy import (back, bcast, dF_dv, energy_from_parts, energy_parts, errors, grad_sq, jac_at,
                     state_energy, weight_grads)
from .observers import restore
from .steps import kappas

SHORTCUTS = True  # post_lin and the parallel wavefront; False: the plain schedule (the tests' reference)


def front(s: int, L: int) -> int:
    """Parallel inference from F-ini (no incremental updates), after s steps: e_l = 0 exactly for l < front(s, L)
    (v_l = mu_l: neither has changed), and step s + 1 moves exactly v_l, l >= front(s + 1, L), recomputes a_l and
    mu_{l+1} for those l and propagates W_{l+1}^T e_{l+1} for those l: at F-ini only e_L != 0; a step moves v_l
    where e_l or e_{l+1} != 0 (dF/dv_l = gamma_l e_l - gamma_{l+1} J_l^T W_{l+1}^T e_{l+1}; velocity 0 before),
    and a moved v_l makes e_l (and, through mu_{l+1}, e_{l+1}) nonzero. Static in s: no host read."""
    return max(1, L - s)


@torch.no_grad()
def step(pc, net: Net, x: torch.Tensor, y: torch.Tensor, opt=None):
    """One training step of ``pc`` (a ``PC``): inference from the feed-forward pass, then the weight gradients
    at its final state. Returns (grads aligned with ``net.params()``, feed-forward loss (K,))."""
    L, T = net.depth, pc.steps
    gam = pc.energy_weights(net)
    wave = SHORTCUTS and pc.mode != "sequential" and pc.init == "forward" and not pc.incremental  # parallel, mupc
    low = (lambda s: front(s, L)) if wave else (lambda s: 1)  # e_l = 0 exactly for l < low(s) after s steps
    cache = SHORTCUTS and not pc.guard  # J_l from post_lin, kept while v_l is (the guard's undo mixes states)
    residual = pc.record or (pc.keep_status and T > 1)  # the status' residual: multi-step inference only
    # feed-forward pass: a[l] activity, mu[l] prediction (mu[L] = f); jacs[l]: J_l at v_l where built (F-ini:
    # from the feed-forward posts of the layers inference reaches, and one below for the final residual)
    if SHORTCUTS and (pc.fpa or pc.init == "forward"):
        u_ff, a_ff, jacs = net.forward(x, lin_from=low(T + 1 if residual else T))
    else:
        u_ff, a_ff = net.forward(x)
        jacs = [None] * L
    kap = kappas(pc, gam, net, a_ff)
    mu = [None] + u_ff[1:]
    a = list(a_ff)
    ff_loss, dldf = loss_and_grad(mu[L], y, pc.loss)
    e_top = -dldf  # e_L
    loss_now = ff_loss  # loss at the current f = mu[L]
    v = [a[0]] + [pc.init_value(mu[l], net) for l in range(1, L)]
    if pc.incremental and opt is None:
        raise ConfigError("incremental PC needs the optimizer: call step(net, x, y, opt=optimizer)")

    def post(l, keep):  # a_l (and J_l, ``keep``: needed later and not under the guard) at the moved v_l
        a[l], jacs[l] = net.post_lin(l, v[l]) if keep and cache else (net.post(l, v[l]), None)

    if pc.init != "forward" and not pc.fpa:  # under FPA predictions stay at their feed-forward values
        for l in range(1, L):
            post(l, True)
            mu[l + 1] = net.predict(l + 1, a[l], v[l])
        loss_now, dldf = loss_and_grad(mu[L], y, pc.loss)
        e_top = -dldf
    if pc.fpa and not SHORTCUTS:
        jacs = [None] + [net.linearize(l, u_ff[l], a_ff[l]) for l in range(1, L)]
    vel = [None] + [torch.zeros_like(v[l]) for l in range(1, L)] if pc.momentum else None
    record = pc.record or pc.tol is not None
    track = record or pc.keep_status or pc.guard  # the energy after every step, per replica, on the device
    K, dev = net.K, u_ff[1].device
    errs = None  # errors of the current state (parallel mode: computed once per state, shared)
    terms = None
    # the status alone only needs the energies after the loop: keep ||e_l|| and the loss of every state (L
    # small ops per step) and add them up once; the guard and record need each energy at once
    lazy = track and not (record or pc.guard)
    if lazy:
        parts = energy_parts(v, mu, errs, loss_now, L, start=pc.init == "forward")
    elif track:
        terms, energy = state_energy(v, mu, errs, loss_now, gam, L, record, start=pc.init == "forward")
        trace = [energy]  # F after every accepted step
    energies = [terms.double().cpu()] if record else []
    scale = torch.ones(K, dtype=u_ff[1].dtype, device=dev) if pc.guard else None
    backtracks = torch.zeros(K, dtype=torch.float64, device=dev) if pc.guard else None
    g0 = None  # sum of squares of dF/dv at the start, per replica
    if residual and pc.mode == "sequential" and pc.init != "forward":
        g0 = grad_sq(net, errors(v, mu, e_top, L), v, a, gam, jacs)
    steps = 0
    for t in range(T):
        m = low(t + 1)  # the lowest layer this step moves
        keep = t < T - 1 or residual  # J_l at the moved v_l is read again
        if pc.guard:  # (a velocity not yet moved stays 0: no copy)
            saved = (list(v), list(a), list(mu), e_top, loss_now,
                     [None] + [q.clone() if l >= m else q for l, q in enumerate(vel[1:], 1)] if vel is not None
                     else None)
        k_eff = kap if scale is None else [scale * k for k in kap]
        if pc.mode == "sequential":
            for l in range(L - 1, 0, -1):
                e_above = e_top if l + 1 == L else v[l + 1] - mu[l + 1]
                b = back(net, l, jac_at(net, jacs, l, v, a), e_above, a[l])
                grad = dF_dv(v[l] - mu[l], b, gam[l - 1], gam[l])
                if residual and t == 0 and l == L - 1 and g0 is None:  # F-ini: every other dF/dv_l is 0 here
                    g0 = grad.flatten(1).pow(2).sum(1)
                v[l] = _move(pc, v[l], grad, k_eff[l - 1], vel, l)
                if not pc.fpa:
                    post(l, keep)
                    mu[l + 1] = net.predict(l + 1, a[l], v[l])
                    if l + 1 == L:
                        loss_now, dldf = loss_and_grad(mu[L], y, pc.loss)
                        e_top = -dldf
        else:
            if errs is None:
                errs = errors(v, mu, e_top, L, low(t))
            for l in range(m, L):  # below m: e_l = e_{l+1} = 0, no move
                b = back(net, l, jac_at(net, jacs, l, v, a), errs[l + 1], a[l])
                grad = dF_dv(errs[l], b, gam[l - 1], gam[l])
                if residual and t == 0:
                    sq = grad.flatten(1).pow(2).sum(1)
                    g0 = sq if l == m else g0 + sq
                v[l] = _move(pc, v[l], grad, k_eff[l - 1], vel, l)
            if not pc.fpa:
                for l in range(m, L):  # below m: v_l, a_l and mu_{l+1} unchanged
                    post(l, keep)
                    mu[l + 1] = net.predict(l + 1, a[l], v[l])
                loss_now, dldf = loss_and_grad(mu[L], y, pc.loss)
                e_top = -dldf
            errs = errors(v, mu, e_top, L, low(t + 1)) if track else None
        steps = t + 1
        if lazy:
            parts += energy_parts(v, mu, errs, loss_now, L)
        elif track:
            new_terms, new = state_energy(v, mu, errs, loss_now, gam, L, record)
            if pc.guard:  # put back every replica whose energy did not decrease (nan included), halve its step
                undo = ~(new <= energy)
                v, a, mu, e_top, loss_now, vel = restore(undo, (v, a, mu, e_top, loss_now, vel), saved)
                errs = None  # the next step's errors from the restored state
                new = torch.where(undo, energy, new)
                if record:
                    new_terms = torch.where(undo, terms, new_terms)
                scale = torch.where(undo, scale * 0.5, scale)
                backtracks += undo
            energy = new
            if record:
                terms = new_terms
            trace.append(energy)
        if pc.incremental and t < pc.steps - 1:
            opt.step(weight_grads(net, errors(v, mu, e_top, L), a, gam))
            for l in range(1, L + 1):
                mu[l] = net.predict(l, a[l - 1], v[l - 1])
            loss_now, dldf = loss_and_grad(mu[L], y, pc.loss)
            e_top = -dldf
            errs = None
            if lazy:  # the next step is compared with the energy at the new weights
                parts += energy_parts(v, mu, errs, loss_now, L)
            elif track:
                terms, energy = state_energy(v, mu, errs, loss_now, gam, L, record)
                trace.append(energy)
        if record:
            energies.append(terms.double().cpu())
            if pc.tol is not None and len(energies) > 1:
                prev, cur = energies[-2].sum(0), energies[-1].sum(0)
                if bool(((prev - cur).abs() <= pc.tol * prev.abs().clamp_min(1e-30)).all()):
                    break
    acts = a_ff if pc.fpa else a
    errs = errs if errs is not None else errors(v, mu, e_top, L, low(steps))  # the final state's errors, once
    grads = weight_grads(net, errs, acts, gam)
    pc._last = (v, u_ff)
    g_end = grad_sq(net, errs, v, a, gam, jacs) if residual else None
    if pc.keep_status:
        tr = energy_from_parts(parts, gam, L, v[1].shape[1]) if lazy else torch.stack(trace)
        prev, cur = tr[:-1], tr[1:]
        if pc.incremental:  # compare each step with the energy at the weights it was made with
            prev, cur = tr[0:-1:2], tr[1::2]
        pc.status.finish(prev, cur, u_ff[1].dtype, g0 if residual else None, g_end, backtracks)
    if pc.record:
        n = sum(v[l][0].numel() for l in range(1, L))
        pc.stats = {"energy": torch.stack(energies), "steps": steps, "residual": (g_end / n).sqrt().double().cpu(),
                    "perturbation": pc.perturbation()}
        if any(isinstance(k, torch.Tensor) for k in kap):
            pc.stats["kappa"] = [k.double().cpu() if isinstance(k, torch.Tensor) else k for k in kap]
        if pc.guard:
            pc.stats["step_scale"] = scale.double().cpu()
    elif pc.tol is not None:
        pc.stats = {"steps": steps}
    return grads, ff_loss


def _move(pc, v, grad, kappa, vel, l):
    """v_l - kappa (grad, or the momentum velocity) with a float or per-replica (K,) kappa."""
    if vel is not None:
        vel[l].mul_(pc.momentum).add_(grad)
        grad = vel[l]
    if isinstance(kappa, torch.Tensor):
        return v - bcast(kappa, v) * grad
    return v - kappa * grad
