"""Step-size policies of PC's inference (docs/pc.md, "The default inference step, per mode"): kappa_l per hidden
layer.

* ``1/gamma``: kappa_l = 1 / gamma_l, exact for the diagonal e_l term (sequential inference, FPA, and the error
  solver, where it is the full step e_l <- G_l);
* below a residual layer, sequential without FPA: kappa_l = 1 / (gamma_l + gamma_{l+1}) (the identity path adds
  gamma_{l+1} to the curvature in v_l);
* ``bound`` (parallel without FPA): kappa_l = 1 / (gamma_l + gamma_{l+1} c_{l+1} s_{l+1}^2), s_{l+1} = ||W_{l+1}||_2
  (``PowerIteration``; ||I + B J|| <= 1 + s below a residual layer), c the largest curvature of the loss in f for
  the output layer (MSE 1, cross-entropy 1/2), 1 otherwise: lambda_max(P^1/2 H P^1/2) < 2, a descent step;
* a fixed kappa (one, or one per hidden layer).
"""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ...nets import Net
from ..declared import PARALLEL_STEPS  # noqa: F401 (the choices of parallel_step)
from .energy import bcast

LOSS_CURVATURE = {"mse": 1.0, "ce": 0.5}  # largest eigenvalue of d^2 loss / df^2 (per sample)
POWER_SEED = 0x5BEC  # the fixed start vector of the power iteration (no replica randomness: same for all)
COLD_ITERS = 100  # power iterations the first time a weight tensor is seen


def kappas(pc, gam: list[float], net: Net | None = None, acts=None) -> list:
    """Per hidden layer: a float, or a (K,) tensor for the bound step (needs the net and the activities
    a_1..a_{L-1}, whose shapes are the spaces the layers above act on)."""
    n = len(gam) - 1
    if pc.kappa is None:
        if not pc.uses_bound:
            if net is None or pc.fpa or pc.mode != "sequential":
                return [1.0 / g for g in gam[:-1]]
            # sequential below a residual layer: the identity path adds gamma_{l+1} to the curvature in v_l
            return [1.0 / (gam[l - 1] + gam[l]) if net.residual(l + 1) else 1.0 / gam[l - 1]
                    for l in range(1, n + 1)]
        out = []
        for l in range(1, n + 1):
            c = LOSS_CURVATURE[pc.loss] if l + 1 == len(gam) else 1.0
            s2 = pc.power.spectral_sq(net, l, acts[l].shape[2:])
            if net.residual(l + 1):  # ||I + W J|| <= 1 + ||W||_2
                s2 = (1 + s2.sqrt()) ** 2
            out.append(1.0 / (gam[l - 1] + gam[l] * c * s2))
        return out
    if isinstance(pc.kappa, (int, float)):
        return [float(pc.kappa)] * n
    k = [float(v) for v in pc.kappa]
    if len(k) != n:
        raise ConfigError(f"need {n} inference step sizes kappa, got {len(k)}")
    return k


class PowerIteration:
    """||W_{l+1}||_2^2 per replica (K,) by power iteration on W^T W with the layer's own maps (dense and conv
    alike), on the device, warm-started from the last call for the same weight tensor: ``COLD_ITERS`` iterations
    the first time, then ``iters`` per call. ||W^T W x|| approaches s^2 from below, within about 1/(2 e n)
    relative after n iterations whatever the spectrum."""

    def __init__(self, iters: int = 1):
        self.iters = iters
        self.vectors: dict = {}  # layer index -> (weight tensor, unit vector (K, 1, ...))

    @torch.no_grad()
    def spectral_sq(self, net: Net, l: int, shape) -> torch.Tensor:
        layer = net.layers[l]
        w = layer.weight
        K, shape = w.shape[0], tuple(shape)
        st = self.vectors.get(l)
        warm = st is not None and st[0] is w and tuple(st[1].shape) == (K, 1, *shape)
        if warm:
            x, iters = st[1], self.iters
        else:
            gen = torch.Generator().manual_seed(POWER_SEED)
            x0 = torch.randn((1, 1, *shape), generator=gen, dtype=torch.float64)
            x = (x0 / x0.norm()).to(device=w.device, dtype=w.dtype).expand(K, *x0.shape[1:]).contiguous()
            iters = COLD_ITERS
        lam = None
        tiny = 1e-300 if w.dtype == torch.float64 else 1e-30
        for _ in range(iters):
            z = layer.backward_input(layer.forward(x, bias=False))
            lam = z.flatten(1).norm(dim=1)  # ||W^T W x|| <= ||W||^2 for unit x
            ok = torch.isfinite(lam) & (lam > 0)
            x = torch.where(bcast(ok, z), z / bcast(lam.clamp_min(tiny), z), x)
        if warm:  # in place: a compiled or captured step keeps its state in the same memory
            st[1].copy_(x)
        else:
            self.vectors[l] = (w, x)
        return torch.nan_to_num(lam, nan=0.0, posinf=0.0)

    def state_dict(self) -> dict:
        """The warm-started vectors by layer (``{}`` when the bound step has not run): a checkpoint continues
        exactly."""
        return {"power": {l: x.detach().cpu().clone() for l, (w, x) in self.vectors.items()}} if self.vectors else {}

    def load_state_dict(self, state: dict, net: Net) -> None:
        weights = {int(l): net.layers[int(l)].weight for l in (state or {}).get("power", {})}
        self.vectors = {int(l): (weights[int(l)], x.to(device=net.device, dtype=weights[int(l)].dtype))
                        for l, x in (state or {}).get("power", {}).items()}
