"""Per-layer SGD / Adam driven by a Parameterization, with a base learning rate per replica.

The learning rate of tensor p in layer l, replica k is ``lr[k] * m^{-c_l}`` (``LayerRule.lr_scale``,
``bias_lr_scale`` for biases): one tensor of shape (K, 1, ...) per parameter, applied with
in-place fused updates. Gradients are *descent* directions' negatives (as autograd gives).

Weight decay wd is ``"l2"`` (wd p added to the gradient: torch.optim.SGD / Adam's ``weight_decay``, not
width-scaled) or ``"decoupled"`` (AdamW / SGDW: p <- p - lr_l (update + wd_l p), torch.optim.AdamW's
convention, wd_l = wd * ``LayerRule.wd_scale``). Adam's epsilon of layer l is eps * ``LayerRule.eps_scale``.
Both scales are resolved by ``Parameterization.rule`` (param.py: the rules and their defaults); this module
only reads them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import ConfigError, check_choice
from .nets import Net
from .util import DEFAULT_LR  # noqa: F401 (the base learning rate when none is given)

OPTIMIZERS = ("sgd", "adam")
WEIGHT_DECAY_MODES = ("l2", "decoupled")  # wd added to the gradient, or AdamW's decoupled decay


def check_hyper(eps: float = 1e-8, weight_decay: float = 0.0, weight_decay_mode: str = "l2") -> None:
    """A ConfigError (one line) unless eps > 0, weight_decay >= 0 (both finite) and the mode is known."""
    for what, v, ok in (("Adam's eps", eps, lambda x: x > 0), ("weight decay", weight_decay, lambda x: x >= 0)):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(x) or not ok(x):
            raise ConfigError(f"{what} must be {'positive' if what.endswith('eps') else 'non-negative'} and finite, "
                              f"got {v!r}")
    check_choice("weight decay mode", weight_decay_mode, WEIGHT_DECAY_MODES, hint="decoupled with adam: AdamW")


def replica_lrs(lr, K: int) -> torch.Tensor:
    """Base learning rates as a float64 tensor of shape (K,) (a scalar is broadcast)."""
    lrs = torch.as_tensor(lr, dtype=torch.float64).flatten()
    if lrs.numel() == 1:
        lrs = lrs.expand(K).clone()
    if lrs.numel() != K:
        raise ConfigError(f"need one learning rate per replica: got {lrs.numel()} for K = {K}")
    if not torch.isfinite(lrs).all() or (lrs < 0).any():
        raise ConfigError(f"learning rates must be finite and non-negative, got {lrs.tolist()}")
    return lrs


class LayerwiseOptimizer:
    """SGD (optional momentum) or Adam over ``params`` with per-layer, per-replica LRs, and weight decay: L2
    (``weight_decay_mode="l2"``) or decoupled (``"decoupled"``; with Adam: AdamW).

    ``eps_scales`` (Adam's eps of each tensor: eps * scale) and ``wd_scales`` (decoupled decay: wd * scale) are
    one per tensor (default 1); ``for_net`` reads them from the layers' ``LayerRule``: the Adam denominator of
    such a tensor is sqrt(v_hat) + eps s, and its moment buffers hold the moments of g itself (torch.optim.Adam's)."""

    def __init__(self, params: Sequence[torch.Tensor], scales: Sequence[float], lr, kind: str = "sgd",
                 momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, weight_decay_mode: str = "l2", eps_scales: Sequence[float] | None = None,
                 wd_scales: Sequence[float] | None = None):
        check_choice("optimizer", kind, OPTIMIZERS)
        if not 0 <= momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        check_hyper(eps, weight_decay, weight_decay_mode)
        self.params, self.kind = list(params), kind
        self.K = self.params[0].shape[0]
        self.base_lr = replica_lrs(lr, self.K)
        self.scales = [float(s) for s in scales]
        self.momentum, self.betas, self.eps, self.weight_decay = momentum, betas, float(eps), float(weight_decay)
        self.decoupled = weight_decay_mode == "decoupled"
        n = len(self.params)
        self.eps_scales = [1.0] * n if eps_scales is None else [float(s) for s in eps_scales]
        self.wd_scales = [1.0] * n if wd_scales is None else [float(s) for s in wd_scales]
        for what, vals in (("learning-rate", self.scales), ("eps", self.eps_scales), ("weight-decay", self.wd_scales)):
            if len(vals) != n or not all(math.isfinite(v) and v > 0 for v in vals):
                raise ConfigError(f"need one positive finite {what} scale per tensor ({n}), got {vals}")
        self.keep = []  # decoupled weight decay: 1 - lr_l wd_l per tensor, (K, 1, ...) like the LRs
        self.t = 0  # steps taken (the eager Adam bias corrections read it)
        self.t_dev = None  # graph-safe mode (set_graph_safe): the step count on the device, advanced in place
        self._dtypes = {p.dtype for p in self.params}
        self.active = torch.ones(self.K, dtype=torch.bool)
        self.lrs = []
        self._set_lrs()
        self.bufs = [torch.zeros_like(p) for p in self.params] if (kind == "adam" or momentum) else None
        self.sq = [torch.zeros_like(p) for p in self.params] if kind == "adam" else None

    @classmethod
    def for_net(cls, net: Net, lr, kind: str = "sgd", **kw) -> "LayerwiseOptimizer":
        """The optimizer of ``net``'s parameters with the scales its layers' ``LayerRule`` resolved (LR, Adam's
        eps, decoupled weight decay)."""
        scales = [net.layers[i].rule.lr_scale if what == "weight" else net.layers[i].rule.bias_lr_scale
                  for i, what in net.param_info()]
        rules = [(net.layers[i].rule, what == "weight") for i, what in net.param_info()]
        kw.setdefault("eps_scales", [r.eps_scale if weight else r.bias_eps_scale for r, weight in rules])
        kw.setdefault("wd_scales", [r.wd_scale if weight else r.bias_wd_scale for r, weight in rules])
        return cls(net.params(), scales, lr, kind, **kw)

    def _set_lrs(self) -> None:
        base = self.base_lr * self.active.to(torch.float64)
        new = [(base * s).to(p.dtype).to(p.device).view(-1, *([1] * (p.dim() - 1)))
               for p, s in zip(self.params, self.scales)]
        if len(self.lrs) == len(new):  # in place: a captured step keeps reading the same tensors
            for old, lr in zip(self.lrs, new):
                old.copy_(lr)
        else:
            self.lrs = new
        if self.decoupled and self.weight_decay:  # 1 - lr_l wd_l (frozen replicas: lr 0, no decay)
            keep = [(1.0 - (base * s) * (self.weight_decay * w)).to(p.dtype).to(p.device)
                    .view(-1, *([1] * (p.dim() - 1))) for p, s, w in zip(self.params, self.scales, self.wd_scales)]
            if len(self.keep) == len(keep):
                for old, k in zip(self.keep, keep):
                    old.copy_(k)
            else:
                self.keep = keep

    def set_graph_safe(self, on: bool = True) -> None:
        """Graph-safe mode (for a compiled or captured training step): the step count lives in a device
        tensor advanced in place, so no Python number that changes from step to step enters ``step`` (a
        compiled step would otherwise be recompiled at every step). SGD computes the same numbers in both
        modes; Adam's bias corrections 1 - beta^t are then computed on the device (equal up to the rounding
        of beta^t). Switching back copies the count to ``t``."""
        if on and not self.graph_safe:
            # shape (1,), not 0-dim: torch.compile (2.13) drops an in-place add to a 0-dim float64 CPU tensor
            self.t_dev = torch.tensor([float(self.t)], dtype=torch.float64, device=self.params[0].device)
        elif not on and self.graph_safe:
            self.t, self.t_dev = self.steps, None

    @property
    def graph_safe(self) -> bool:
        """Whether the step count lives on the device (``set_graph_safe``)."""
        return self.t_dev is not None

    @property
    def steps(self) -> int:
        """Steps taken (in graph-safe mode read back from the device)."""
        return int(self.t_dev.item()) if self.graph_safe else self.t

    def freeze(self, replicas: torch.Tensor) -> None:
        """Stop updating the replicas where ``replicas`` is True (e.g. diverged ones)."""
        self.active &= ~replicas.cpu()
        self._set_lrs()

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """p <- p - lr g (SGD; g <- momentum buf + g with momentum), or Adam:
        m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
        p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps_l).
        Weight decay: L2 g <- g + wd p first; decoupled p <- p (1 - lr wd_l) first (torch.optim.AdamW's order:
        together p <- p - lr (update + wd_l p) with the update computed from g alone)."""
        if self.graph_safe:
            t = self.t_dev.add_(1)  # a float64 device tensor
        else:
            t = self.t = self.t + 1
        c1, c2 = (1 - self.betas[0] ** t, 1 - self.betas[1] ** t) if self.kind == "adam" else (None, None)
        if self.graph_safe and c1 is not None:  # the device corrections cast once per dtype, not per tensor
            by_dtype = {dt: (c2.to(dt), (-1.0 / c1).to(dt)) for dt in self._dtypes}
        for i, (p, g, lr) in enumerate(zip(self.params, grads, self.lrs)):
            if g is None:
                continue
            if self.weight_decay:
                if self.decoupled:
                    p.mul_(self.keep[i])
                else:
                    g = g.add(p, alpha=self.weight_decay)
            if self.kind == "sgd":
                if self.momentum:
                    g = self.bufs[i].mul_(self.momentum).add_(g)
                p.addcmul_(lr, g, value=-1.0)
            else:
                b1, b2 = self.betas
                eps = self.eps * self.eps_scales[i]  # eps_l = eps s
                m, v = self.bufs[i], self.sq[i]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if self.graph_safe:
                    c2_t, neg_inv_c1 = by_dtype[p.dtype]
                    denom = (v / c2_t).sqrt_().add_(eps)
                    p.addcmul_(lr * neg_inv_c1, m / denom)
                else:
                    denom = (v / c2).sqrt_().add_(eps)
                    p.addcmul_(lr, m / denom, value=-1.0 / c1)

    def state_dict(self) -> dict:
        return dict(kind=self.kind, t=self.steps, base_lr=self.base_lr.clone(), active=self.active.clone(),
                    bufs=[b.cpu().clone() for b in self.bufs] if self.bufs else None,
                    sq=[b.cpu().clone() for b in self.sq] if self.sq else None, moments_of="g")

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ConfigError(f"optimizer state is for '{state.get('kind')}', not '{self.kind}'")
        self.t, self.base_lr, self.active = state["t"], state["base_lr"], state["active"]
        if self.graph_safe:
            self.t_dev.fill_(float(self.t))
        for power, mine, theirs in ((1, self.bufs, state["bufs"]), (2, self.sq, state["sq"])):
            if mine is not None and theirs is not None:
                for b, saved, scale in zip(mine, theirs, self.eps_scales):
                    b.copy_(saved)
                    if self.kind == "adam" and state.get("moments_of") != "g" and scale != 1.0:
                        b.mul_(scale ** power)  # saved without the mark (earlier versions): the moments of g / s
        self._set_lrs()


def lr_table(net: Net, lr: float) -> list[dict]:
    """Per-tensor learning rates of ``net`` for base learning rate ``lr`` (for describe / tests)."""
    out = []
    for i, what in net.param_info():
        rule = net.layers[i].rule
        scale = rule.lr_scale if what == "weight" else rule.bias_lr_scale
        out.append(dict(layer=i + 1, tensor=what, role=rule.role, lr=lr * scale))
    return out


__all__ = ["DEFAULT_LR", "LayerwiseOptimizer", "replica_lrs", "lr_table", "OPTIMIZERS", "WEIGHT_DECAY_MODES",
           "check_hyper"]
