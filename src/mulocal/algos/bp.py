"""Backpropagation written as the same explicit layer-local computation the other rules use.

    delta_L = dl/df,   delta_l = phi'(u_l) * (W_{l+1}^T delta_{l+1})   (Net.linearize: phi' for the MLP, a vjp through pooling for the CNN)
    grad W_l = mean_batch(delta_l a_{l-1}^T),   grad b_l = mean_batch(delta_l)

No autograd graph is built; tests check it against autograd.
"""
from __future__ import annotations

import torch

from ..losses import check_loss, loss_and_grad
from ..nets import Net


class BP:
    """Gradient of the batch-mean loss of every replica."""

    name = "bp"
    family = "backpropagation"
    OPTIONS = ()

    def __init__(self, loss: str = "ce"):
        self.loss = check_loss(loss)

    @torch.no_grad()
    def step(self, net: Net, x: torch.Tensor, y: torch.Tensor, opt=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(gradients aligned with ``net.params()``, batch loss per replica (K,))."""
        us, acts = net.forward(x)
        loss, delta = loss_and_grad(us[-1], y, self.loss)
        return backprop(net, us, acts, delta), loss


def backprop(net: Net, us, acts, delta) -> list[torch.Tensor]:
    """Gradients of sum(delta * f) / B for an output-side signal ``delta`` (K, B, C)."""
    grads: list = []
    for l in range(net.depth, 0, -1):
        layer = net.layers[l - 1]
        gw, gb = layer.grads(delta, acts[l - 1])
        grads[:0] = [gw] if gb is None else [gw, gb]
        if l > 1:
            delta = net.linearize(l - 1, us[l - 1], acts[l - 1])(layer.backward_input(delta))
    return grads
