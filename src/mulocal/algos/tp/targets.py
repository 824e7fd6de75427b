"""The machinery every target rule shares (TP, DTP, GNT): the forward pass, the output target's loss gradient,
each layer's local loss 1/2 ||t_l - h_l||^2 and its gradient in W_l, and the diagnostics (target distances, cosines
with backprop). A subclass sets the targets (``targets``) and may do per-batch work first (``prepare``). Equations:
the package's docstring.
"""
from __future__ import annotations

import math

import torch

from ...errors import ConfigError
from ...losses import check_loss, loss_and_grad
from ...nets import Net
from ..bp import backprop
from ..declared import TARGET_OPTIONS, family


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


class _Clock:
    """Accumulates wall time per phase into ``rule.timings`` (a dict of seconds)."""

    def __init__(self, rule):
        import time
        self.now, self.rule = time.perf_counter, rule
        self.t = self.now()
        if not hasattr(rule, "timings"):
            rule.timings = {}

    def lap(self, name: str) -> None:
        t = self.now()
        self.rule.timings[name] = self.rule.timings.get(name, 0.0) + t - self.t
        self.t = t


class TargetRule:
    """Shared machinery: forward pass, targets (subclass), local losses, diagnostics."""

    name = "targets"
    family = family("tp")
    OPTIONS = TARGET_OPTIONS

    def __init__(self, loss: str = "ce", beta: float = 1.0, record: bool = False):
        self.loss = check_loss(loss)
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ConfigError(f"beta (output target step) must be a positive number, got {beta!r}")
        self.beta, self.record = float(beta), record
        self.stats: dict = {}

    def targets(self, net: Net, us, acts, f, dldf) -> list:
        """Targets t_1..t_L (index l; t[0] unused), each shaped like h_l (acts[l], or f)."""
        raise NotImplementedError

    def prepare(self, net: Net, us, acts, f) -> None:
        """Per-batch work before targets (feedback training)."""

    profile = False  # set True to accumulate seconds per phase in ``self.timings``

    def compile_blocker(self, net: Net) -> str | None:
        """Why this rule's step cannot run as one compiled graph (``TrainConfig.compile``), or None."""
        if self.profile:
            return "profile times each phase on the host"
        if self.record:
            return "record reads diagnostics back to the host at every step"
        if getattr(self, "trainable", False) and self.fb_iters and self._source_on(net) == "host":
            return f"{self.name.upper()}'s noise_rng='{self.noise_rng}' draws the feedback noise on host " \
                   f"generators here (noise_rng='counter' draws it on the device)"
        return None

    def run_facts(self) -> dict:
        """What a run's history rows record about how this rule ran, beyond its options ({}: nothing)."""
        return {}

    @staticmethod
    def space(net: Net, us, acts) -> list:
        """The activities targets are set for, h_0..h_{L-1}: a_l = post(u_l), or for a residual net the stream
        u_l (h_0 = a_0, the input, in both)."""
        return [acts[0]] + list(us[1:net.depth]) if net.residual_net else list(acts)

    @torch.no_grad()
    def step(self, net: Net, x: torch.Tensor, y: torch.Tensor, opt=None):
        clock = _Clock(self) if self.profile else None
        us, acts = net.forward(x)
        f = us[-1]
        loss, dldf = loss_and_grad(f, y, self.loss)
        clock and clock.lap("forward")
        self.prepare(net, us, acts, f)
        clock and clock.lap("feedback")
        t = self.targets(net, us, acts, f, dldf)
        clock and clock.lap("targets")
        grads = self.local_grads(net, us, acts, f, t)
        clock and clock.lap("local_grads")
        self._last = (self.space(net, us, acts), f, t)
        if self.record:
            self._record(net, us, acts, f, t, dldf, grads)
        return grads, loss

    @staticmethod
    def local_grads(net: Net, us, acts, f, t) -> list:
        L = net.depth
        grads: list = []
        for l in range(1, L + 1):
            if l == L:
                delta = f - t[L]
            elif net.residual_net:  # the target is on the stream u_l itself
                delta = us[l] - t[l]
            else:
                delta = net.linearize(l, us[l], acts[l])(acts[l] - t[l])
            grads += net.layers[l - 1].param_grads(delta, acts[l - 1])
        return grads

    def target_distances(self) -> dict[str, torch.Tensor]:
        """RMS of t_l - h_l per layer (K,) for the last batch."""
        acts, f, t = self._last
        L = len(t) - 1
        h = list(acts) + [f]
        return {f"tdist_{l}": (t[l] - h[l]).flatten(1).double().pow(2).mean(1).sqrt().cpu() for l in range(1, L + 1)}

    def _record(self, net, us, acts, f, t, dldf, grads) -> None:
        bp = backprop(net, us, acts, dldf)
        cos = {}
        for (i, what), g, b in zip(net.param_info(), grads, bp):
            if what == "weight":
                cos[f"bp_cos_{i + 1}"] = _cos(g, b).cpu()
        fb = {k: v.cpu() for k, v in getattr(self, "fb_stats", {}).items()}
        self.stats = {**self.target_distances(), **cos, **fb}

    def coord_observables(self, net, x, y) -> dict[str, torch.Tensor]:
        return self.target_distances()
