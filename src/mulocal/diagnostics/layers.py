"""Does every layer learn? Relative change of each layer's weights and values over training.

K replicas train for the given batches with a learning rule; then, per layer l = 1..L (mean over replicas):

================  ==============================================================================
name              quantity
================  ==============================================================================
``dW_rel[l]``     ||W_l(T) - W_l(0)||_F / ||W_l(0)||_F  (the layer's own relative update)
``du_rel[l]``     ||u_l(T) - u_l(0)|| / ||u_l(0)||  on a fixed probe batch (the value / residual stream;
                  in a residual net it accumulates the changes of every layer below)
``ratio_top[l]``  dW_rel[l] / dW_rel[top], top = the top hidden layer L - 1 (the top block of a residual net)
================  ==============================================================================

``min_ratio`` is the smallest ``ratio_top`` over the hidden layers below the top one (the blocks 2..L-2 of a
residual net), ``within_10x`` whether it is at least 1/10: every block moved at least a tenth as much, relative
to its size, as the top block (the ePC critique of muPC: the deep blocks of a residual PC net barely move, so it
"only trains a shallow submodel"). No autograd: the learning rule's own step and the optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import ConfigError
from ..nets import Net
from ..optim import LayerwiseOptimizer
from .measure import norm

WITHIN = 0.1  # a block "learns" when its relative update is at least this fraction of the top block's


def _rel(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """||new - old|| / ||old|| per replica (K,)."""
    return norm(new - old) / norm(old).clamp_min(1e-300)


@dataclass
class LayerResult:
    depth: int
    steps: int
    dW_rel: list[float]
    du_rel: list[float]
    losses: list[float] = field(default_factory=list)  # mean training loss per step

    @property
    def top(self) -> int:
        return self.depth - 1  # the top hidden layer (1-based)

    @property
    def ratio_top(self) -> list[float]:
        t = self.dW_rel[self.top - 1]
        return [v / t if t > 0 else float("nan") for v in self.dW_rel]

    @property
    def min_ratio(self) -> float:
        below = self.ratio_top[1:self.top - 1]  # hidden layers 2 .. L-2
        return min(below) if below else float("nan")

    @property
    def within_10x(self) -> bool:
        return bool(self.min_ratio >= WITHIN)

    def to_dict(self) -> dict:
        return {"depth": self.depth, "steps": self.steps, "dW_rel": self.dW_rel, "du_rel": self.du_rel,
                "ratio_top": self.ratio_top, "min_ratio": self.min_ratio, "within_10x": self.within_10x,
                "losses": self.losses}

    def table(self, every: int = 1) -> str:
        lines = [f"{'layer':>6}{'dW_rel':>12}{'du_rel':>12}{'/ top':>9}"]
        for l in range(1, self.depth + 1):
            if l in (1, 2, self.top, self.depth) or l % every == 0:
                lines.append(f"{l:>6}{self.dW_rel[l - 1]:>12.3g}{self.du_rel[l - 1]:>12.3g}"
                             f"{self.ratio_top[l - 1]:>9.3g}")
        lines.append(f"smallest block update / top block's: {self.min_ratio:.3g} -> "
                     + ("every block within 10x" if self.within_10x else "some blocks move < 1/10 of the top block"))
        return "\n".join(lines)


@torch.no_grad()
def layer_changes(net: Net, algo, batches: Sequence[tuple], probe: torch.Tensor, lr: float,
                  optimizer: str = "sgd") -> LayerResult:
    """Train ``net`` with ``algo`` on ``batches`` (one step each) and measure every layer's relative change."""
    if not batches:
        raise ConfigError("the per-layer diagnostic needs at least one training step")
    w0 = [layer.weight.clone() for layer in net.layers]
    us0 = net.forward(probe)[0]
    opt = LayerwiseOptimizer.for_net(net, lr, optimizer)
    losses = []
    for x, y in batches:
        grads, loss = algo.step(net, x, y, opt=opt)
        opt.step(grads)
        losses.append(float(loss.double().mean()))
    us = net.forward(probe)[0]
    dW = [float(_rel(layer.weight, w).mean()) for layer, w in zip(net.layers, w0)]
    du = [float(_rel(us[l], us0[l]).mean()) for l in range(1, net.depth + 1)]
    return LayerResult(net.depth, len(batches), dW, du, losses)
