"""Backpropagation written as the same explicit layer-local computation the other rules use.

    delta_L = dl/df,   delta_l = phi'(u_l) * (W_{l+1}^T delta_{l+1})   (Net.linearize: phi' for the MLP, a vjp through pooling for the CNN)
    grad W_l = mean_batch(delta_l a_{l-1}^T),   grad b_l = mean_batch(delta_l)

Residual nets (``Net.residual(l)``: u_l = u_{l-1} + a_l (mult_l W_l a_{l-1} + b_l), ``nets.ResMLP``) add
the identity path to the backward signal:

    delta_{l-1} = delta_l + phi'(u_{l-1}) * (a_l mult_l W_l^T delta_l)
    grad W_l = a_l mult_l mean_batch(delta_l a_{l-1}^T),   grad b_l = a_l mean_batch(delta_l)

(the branch multiplier a_l sits in the layer's ``mult``, ``backward_input`` and ``grads``).

No autograd graph is built; tests check it against autograd.

``readout_only=True``: the feature-learning baseline. Only the output layer gets its gradient (grad W_L,
grad b_L above); every hidden layer's gradient is 0, so its weights stay at their random initialisation
(with SGD, momentum or Adam a zero gradient moves nothing; weight decay would still shrink them). The
accuracy of this run at its best learning rate is what training the readout on frozen random features
reaches: a rule that does not beat it at some width has not learned features there.
"""
from __future__ import annotations

import torch

from ..losses import check_loss, loss_and_grad
from ..nets import Net
from .declared import BP_OPTIONS, family


class BP:
    """Gradient of the batch-mean loss of every replica."""

    name = "bp"
    family = family("bp")
    OPTIONS = BP_OPTIONS

    def __init__(self, loss: str = "ce", readout_only: bool = False):
        self.loss = check_loss(loss)
        self.readout_only = bool(readout_only)

    @torch.no_grad()
    def step(self, net: Net, x: torch.Tensor, y: torch.Tensor, opt=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(gradients aligned with ``net.params()``, batch loss per replica (K,))."""
        if self.readout_only:
            us, acts = net.forward(x)
            loss, delta = loss_and_grad(us[-1], y, self.loss)
            top = net.layers[-1].param_grads(delta, acts[-1])  # acts: a_0..a_{L-1}
            hidden = [torch.zeros_like(p) for p in net.params()[:-len(top)]]
            return hidden + top, loss
        us, acts, jacs = net.forward(x, lin_from=1)  # each post's linearization from its own evaluation
        loss, delta = loss_and_grad(us[-1], y, self.loss)
        return backprop(net, us, acts, delta, jacs), loss


def backprop(net: Net, us, acts, delta, jacs=None) -> list[torch.Tensor]:
    """Gradients of sum(delta * f) / B for an output-side signal ``delta`` (K, B, C); ``jacs[l]``: the post's
    linearization at u_l where the forward built it (``Net.forward(x, lin_from=1)``: a pooled post is then not
    evaluated again), else built here."""
    grads: list = []
    for l in range(net.depth, 0, -1):
        layer = net.layers[l - 1]
        grads[:0] = layer.param_grads(delta, acts[l - 1])
        if l > 1:
            jac = jacs[l - 1] if jacs is not None and jacs[l - 1] is not None else \
                net.linearize(l - 1, us[l - 1], acts[l - 1])
            back = jac(layer.backward_input(delta, acts[l - 1]))
            delta = back + delta if net.residual(l) else back
    return grads
