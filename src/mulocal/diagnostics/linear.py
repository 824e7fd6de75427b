"""Deep linear predictive coding in closed form (PAPER section 4, Theorem 4.2).

With phi = identity and MSE, the inference equilibrium is

    e_L* = (I + C)^{-1} (y - W_{L:1} x),      e_l* = (gamma_L / gamma_l) W_{L:l+1}^T e_L*,
    C    = sum_{i<L} (gamma_L / gamma_i) W_{L:i+1} W_{L:i+1}^T,     W_{L:k} = W_L ... W_k,

and v_l* = W_l v_{l-1}* + e_l*. PC's weight update is then GD with the output residual
preconditioned by (I + C)^{-1}: C -> 0 gives the gradient, C >> I a Gauss-Newton-like step.
Samples are rows here (x: (B, d), y: (B, C)); weights are (out, in) with multipliers folded in.
"""
from __future__ import annotations

from typing import Sequence

import torch


def chain(Ws: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """W_{L:k} = W_L ... W_k for 1 <= k <= L + 1 (W_{L:L+1} = I)."""
    out = torch.eye(Ws[-1].shape[0], dtype=Ws[-1].dtype, device=Ws[-1].device)
    for W in reversed(Ws[k - 1:]):
        out = out @ W
    return out


def preconditioner(Ws: Sequence[torch.Tensor], gammas: Sequence[float]) -> torch.Tensor:
    """C = sum_{i<L} (gamma_L / gamma_i) W_{L:i+1} W_{L:i+1}^T  (C x C)."""
    L = len(Ws)
    C = torch.zeros(Ws[-1].shape[0], Ws[-1].shape[0], dtype=Ws[-1].dtype, device=Ws[-1].device)
    for i in range(1, L):
        P = chain(Ws, i + 1)
        C = C + (gammas[-1] / gammas[i - 1]) * P @ P.T
    return C


def pc_fixed_point(Ws: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   gammas: Sequence[float]) -> dict:
    """Closed-form equilibrium: errors e_1..e_L, values v_0..v_{L-1}, C and the weight gradients
    grad W_l = -gamma_l mean_batch(e_l v_{l-1}^T) that PC hands to the optimizer."""
    L = len(Ws)
    C = preconditioner(Ws, gammas)
    resid = y - x @ chain(Ws, 1).T
    I = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    eL = torch.linalg.solve(I + C, resid.T).T
    errs = [(gammas[-1] / gammas[l - 1]) * eL @ chain(Ws, l + 1) for l in range(1, L)] + [eL]
    vs = [x]
    for l in range(1, L):
        vs.append(vs[-1] @ Ws[l - 1].T + errs[l - 1])
    grads = [-gammas[l - 1] * errs[l - 1].T @ vs[l - 1] / x.shape[0] for l in range(1, L + 1)]
    return {"errors": errs, "values": vs, "C": C, "grads": grads}
