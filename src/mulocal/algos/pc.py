"""Predictive coding as an explicit local computation (no autograd through the network).

Value nodes v_0 = x (clamped) and v_1..v_{L-1} (pre-activations, free). With predictions
mu_l = W_l post(v_{l-1}) and f = mu_L:

    e_l = v_l - mu_l                 (l < L)          e_L = -dloss/df
    F   = sum_{l<L} gamma_l / 2 ||e_l||^2 + gamma_L loss(f)
    dF/dv_l = gamma_l e_l - gamma_{l+1} J_l^T W_{l+1}^T e_{l+1},    J_l = d post(v_l) / d v_l
    v_l <- v_l - kappa_l dF/dv_l      (kappa_l = 1 / gamma_l by default)
    grad W_l = -gamma_l mean_batch(e_l post(v_{l-1})^T),   grad b_l = -gamma_l mean_batch(e_l)

gamma_l = 1 for hidden layers and gamma_L = gamma'_L m^{-gbar_L} from the Parameterization.

Options: sequential inference (SI: top-down, each layer sees the freshest values above) or
parallel (all layers from one snapshot); T steps (T = 1 is single-shot); value initialisation
forward (F-ini: v_l = u_l, so every hidden error starts at 0), zero or random; the fixed
prediction assumption (FPA: mu_l, J_l and the presynaptic activities frozen at their
feed-forward values during inference and the update); inference momentum; early stop on the
relative energy change; incremental PC (weights updated after every inference step).

Identity (tested): F-ini + FPA + SI + T = 1 + kappa_l = 1/gamma_l gives e_l = -(gamma_L/gamma_l)
delta_l^BP and an update equal to gamma_L times the BP gradient.

Cost: every prediction is recomputed once, only when its input changed; under FPA nothing is
recomputed. A sequential step costs one W^T product (and, without FPA, one W product) per
hidden layer.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..losses import check_loss, loss_and_grad
from ..nets import Net
from ..streams import generators
from .options import Option

INFERENCE = ("sequential", "parallel")
INITS = ("forward", "zero", "random")


class PC:
    """Predictive coding learning rule. ``step(net, x, y, opt=None) -> (grads, loss)``."""

    name = "pc"
    family = "predictive coding"
    OPTIONS = (
        Option("T", "int", 1, "inference steps (1: single-shot)"),
        Option("inference", "str", "sequential", "sequential (top-down) or parallel", choices=INFERENCE),
        Option("init", "str", "forward", "value initialisation: forward, zero or random", choices=INITS),
        Option("fpa", "bool", False, "fixed prediction assumption"),
        Option("kappa", "floats", None, "inference step size, one or one per hidden layer (default 1/gamma_l)"),
        Option("momentum", "float", 0.0, "inference momentum", flag="inference-momentum"),
        Option("tol", "float", None, "stop inference when the energy changes less than this (relative)"),
        Option("incremental", "bool", False, "incremental PC: update weights at every inference step"),
        Option("gammas", "floats", None, "hidden-layer energy weights gamma_1..gamma_{L-1} (default 1)"),
    )

    def __init__(self, loss: str = "ce", T: int = 1, inference: str = "sequential", init: str = "forward",
                 fpa: bool = False, kappa: float | Sequence[float] | None = None, momentum: float = 0.0,
                 tol: float | None = None, incremental: bool = False, gammas: Sequence[float] | None = None,
                 record: bool = False, seed: int = 0):
        self.loss = check_loss(loss)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ConfigError(f"number of inference steps T must be a positive integer, got {T!r}")
        if inference not in INFERENCE:
            raise ConfigError(f"unknown inference '{inference}'; choose one of {', '.join(INFERENCE)}")
        if init not in INITS:
            raise ConfigError(f"unknown value initialisation '{init}'; choose one of {', '.join(INITS)}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"inference momentum must be in [0, 1), got {momentum}")
        if incremental and fpa:
            raise ConfigError("incremental PC updates the weights during inference, which FPA freezes: pick one")
        if tol is not None and not tol > 0:
            raise ConfigError(f"tol must be positive, got {tol}")
        self.T, self.inference, self.init, self.fpa = T, inference, init, bool(fpa)
        self.kappa, self.momentum, self.tol, self.incremental = kappa, momentum, tol, bool(incremental)
        self.gammas, self.record = gammas, record
        self.seed = int(seed)
        self._gens: tuple | None = None  # per-replica generators for random value initialisation
        self.stats: dict = {}
        self._last = None

    # ------------------------------------------------------------------ set-up
    def energy_weights(self, net: Net) -> list[float]:
        """gamma_1..gamma_L (index l - 1)."""
        L = net.depth
        hidden = [1.0] * (L - 1) if self.gammas is None else [float(g) for g in self.gammas]
        if len(hidden) != L - 1 or any(g <= 0 for g in hidden):
            raise ConfigError(f"need {L - 1} positive hidden energy weights, got {self.gammas!r}")
        return hidden + [net.param.gamma_L(net.width)]

    def _kappas(self, gam: list[float]) -> list[float]:
        n = len(gam) - 1
        if self.kappa is None:
            return [1.0 / g for g in gam[:-1]]
        if isinstance(self.kappa, (int, float)):
            return [float(self.kappa)] * n
        k = [float(v) for v in self.kappa]
        if len(k) != n:
            raise ConfigError(f"need {n} inference step sizes kappa, got {len(k)}")
        return k

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, net: Net, x: torch.Tensor, y: torch.Tensor, opt=None):
        L = net.depth
        gam = self.energy_weights(net)
        kap = self._kappas(gam)
        layers = net.layers
        # feed-forward pass: a[l] activity, mu[l] prediction (mu[L] = f)
        u_ff, a_ff = net.forward(x)
        mu = [None] + u_ff[1:]
        a = list(a_ff)
        ff_loss, dldf = loss_and_grad(mu[L], y, self.loss)
        e_top = -dldf  # e_L
        v = [a[0]] + [self._init_value(mu[l], net) for l in range(1, L)]
        if self.incremental and opt is None:
            raise ConfigError("incremental PC needs the optimizer: call step(net, x, y, opt=optimizer)")
        if self.init != "forward" and not self.fpa:  # under FPA predictions stay at their feed-forward values
            for l in range(1, L):
                a[l] = net.post(l, v[l])
                mu[l + 1] = layers[l].forward(a[l])
            e_top = -loss_and_grad(mu[L], y, self.loss)[1]
        jac_ff = [None] + [net.linearize(l, u_ff[l], a_ff[l]) for l in range(1, L)] if self.fpa else None
        vel = [None] + [torch.zeros_like(v[l]) for l in range(1, L)] if self.momentum else None
        record = self.record or self.tol is not None
        energies = [self._energy(v, mu, e_top, y, gam, net)] if record else []
        steps = 0
        for t in range(self.T):
            if self.inference == "sequential":
                for l in range(L - 1, 0, -1):
                    e_above = e_top if l + 1 == L else v[l + 1] - mu[l + 1]
                    jac = jac_ff[l] if self.fpa else net.linearize(l, v[l], a[l])
                    grad = (v[l] - mu[l]).mul_(gam[l - 1]).sub_(jac(layers[l].backward_input(e_above)),
                                                                  alpha=gam[l])
                    v[l] = self._move(v[l], grad, kap[l - 1], vel, l)
                    if not self.fpa:
                        a[l] = net.post(l, v[l])
                        mu[l + 1] = layers[l].forward(a[l])
                        if l + 1 == L:
                            e_top = -loss_and_grad(mu[L], y, self.loss)[1]
            else:
                errs = [None] + [v[l] - mu[l] for l in range(1, L)] + [e_top]
                for l in range(1, L):
                    jac = jac_ff[l] if self.fpa else net.linearize(l, v[l], a[l])
                    grad = errs[l].mul(gam[l - 1]).sub_(jac(layers[l].backward_input(errs[l + 1])), alpha=gam[l])
                    v[l] = self._move(v[l], grad, kap[l - 1], vel, l)
                if not self.fpa:
                    for l in range(1, L):
                        a[l] = net.post(l, v[l])
                        mu[l + 1] = layers[l].forward(a[l])
                    e_top = -loss_and_grad(mu[L], y, self.loss)[1]
            steps = t + 1
            if self.incremental and t < self.T - 1:
                opt.step(self._weight_grads(net, v, mu, a, e_top, gam))
                for l in range(1, L + 1):
                    mu[l] = layers[l - 1].forward(a[l - 1])
                e_top = -loss_and_grad(mu[L], y, self.loss)[1]
            if record:
                energies.append(self._energy(v, mu, e_top, y, gam, net))
                if self.tol is not None and len(energies) > 1:
                    prev, cur = energies[-2].sum(0), energies[-1].sum(0)
                    if bool(((prev - cur).abs() <= self.tol * prev.abs().clamp_min(1e-30)).all()):
                        break
        acts = a_ff if self.fpa else a
        grads = self._weight_grads(net, v, mu, acts, e_top, gam)
        self._last = (v, u_ff)
        if self.record:
            self.stats = {"energy": torch.stack(energies), "steps": steps,
                          "residual": self._residual(net, v, mu, a, e_top, gam, jac_ff),
                          "perturbation": self.perturbation()}
        elif self.tol is not None:
            self.stats = {"steps": steps}
        return grads, ff_loss

    # ------------------------------------------------------------------ pieces
    def _init_value(self, u: torch.Tensor, net: Net) -> torch.Tensor:
        if self.init == "forward":
            return u
        if self.init == "zero":
            return torch.zeros_like(u)
        # one stream per replica, derived from the replica's seed: K replicas = K separate runs
        seeds = tuple(getattr(net, "seeds", range(net.K)))
        if self._gens is None or self._gens[0] != seeds:
            self._gens = (seeds, generators("pc_values", seeds, self.seed))
        return torch.stack([torch.randn(u.shape[1:], generator=g, dtype=u.dtype) for g in self._gens[1]]).to(u.device)

    def _move(self, v, grad, kappa, vel, l):
        if vel is not None:
            vel[l].mul_(self.momentum).add_(grad)
            grad = vel[l]
        return v - kappa * grad

    @staticmethod
    def _weight_grads(net, v, mu, acts, e_top, gam):
        L = net.depth
        grads: list = []
        for l in range(1, L + 1):
            err = e_top if l == L else v[l] - mu[l]
            gw, gb = net.layers[l - 1].grads(err.mul(-gam[l - 1]), acts[l - 1])
            grads += [gw] if gb is None else [gw, gb]
        return grads

    def _energy(self, v, mu, e_top, y, gam, net) -> torch.Tensor:
        """Per-layer energy terms (L, K): gamma_l/2 mean_batch ||e_l||^2 and gamma_L loss."""
        L = net.depth
        rows = [0.5 * gam[l - 1] * (v[l] - mu[l]).flatten(2).pow(2).sum(-1).mean(-1) for l in range(1, L)]
        rows.append(gam[-1] * loss_and_grad(mu[L], y, self.loss)[0])
        return torch.stack(rows).double().cpu()

    def _residual(self, net, v, mu, a, e_top, gam, jac_ff) -> torch.Tensor:
        """RMS over hidden layers of dF/dv_l at the final values, per replica (K,)."""
        L = net.depth
        tot = 0
        n = 0
        for l in range(1, L):
            e_above = e_top if l + 1 == L else v[l + 1] - mu[l + 1]
            jac = jac_ff[l] if self.fpa else net.linearize(l, v[l], a[l])
            g = gam[l - 1] * (v[l] - mu[l]) - gam[l] * jac(net.layers[l].backward_input(e_above))
            tot = tot + g.flatten(1).pow(2).sum(1)
            n += g[0].numel()
        return (tot / n).sqrt().double().cpu()

    def perturbation(self) -> dict[str, torch.Tensor]:
        """RMS of v_l minus its feed-forward value after the last inference, per layer (K,)."""
        if self._last is None:
            return {}
        v, u_ff = self._last
        return {f"pert_{l}": (v[l] - u_ff[l]).flatten(1).double().pow(2).mean(1).sqrt().cpu()
                for l in range(1, len(v))}

    def coord_observables(self, net, x, y) -> dict[str, torch.Tensor]:
        return self.perturbation()
