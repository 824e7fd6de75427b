"""The naive PC of ``bench_pc.py``'s section 3: predictive coding the straightforward eager-PyTorch way (``nn.Linear``
layers, value nodes as tensors with ``requires_grad``, ``torch.autograd.grad`` of the energy, ``torch.optim.SGD``),
timed as mulocal is, and checked against mulocal's parallel PC on one batch (same weights, SP, gamma = 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from _common import BATCH, DEPTH, shuffled_steps
from mulocal.algos.pc import PC
from mulocal.data import Dataset
from mulocal.nets import build
from mulocal.param import preset


class NaivePC:
    """Predictive coding the straightforward eager-PyTorch way: autograd on the energy.

    Value nodes v_1..v_{L-1} are the hidden pre-activations, initialised by a feed-forward pass;
    with mu_l = W_l tanh(v_{l-1}) (v_0 = x, not squashed) and f = W_L tanh(v_{L-1}) the energy is

        E = sum_{l<L} 1/2 ||v_l - mu_l||^2 + CE(f, y)        (summed over the batch, gamma_l = 1)

    Inference: T steps v <- v - 1 * dE/dv (step size kappa = 1/gamma = 1; summing over the batch
    keeps each sample's step independent of B). Learning: autograd of E / B with respect to the
    weights at the final values, then ``torch.optim.SGD``.
    """

    def __init__(self, in_dim: int, width: int, n_classes: int, T: int, lr: float, seed: int = 0,
                 device: str = "cpu"):
        torch.manual_seed(seed)
        dims = [in_dim] + [width] * (DEPTH - 1) + [n_classes]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(DEPTH)).to(device)
        self.T = T
        self.opt = torch.optim.SGD(self.layers.parameters(), lr=lr)

    def energy(self, x: torch.Tensor, values: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        a, E = x, 0.0
        for layer, v in zip(self.layers[:-1], values):
            E = E + 0.5 * (v - layer(a)).pow(2).sum()
            a = torch.tanh(v)
        return E + F.cross_entropy(self.layers[-1](a), y, reduction="sum")

    def compute_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inference, then leave dE/dW in the parameters' ``.grad``; returns the feed-forward batch loss."""
        x = x.flatten(1)
        with torch.no_grad():  # forward initialisation of the value nodes
            a, values = x, []
            for layer in self.layers[:-1]:
                values.append(layer(a))
                a = torch.tanh(values[-1])
            ff_loss = F.cross_entropy(self.layers[-1](a), y)
        values = [v.requires_grad_(True) for v in values]
        for _ in range(self.T):
            grads = torch.autograd.grad(self.energy(x, values, y), values)
            with torch.no_grad():
                for v, g in zip(values, grads):
                    v.sub_(g)
        self.opt.zero_grad(set_to_none=True)
        (self.energy(x, [v.detach() for v in values], y) / x.shape[0]).backward()
        return ff_loss

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.compute_grads(x, y)
        self.opt.step()
        return loss


def time_naive(data: Dataset, width: int, T: int, lr: float, steps: int, warmup: int, seed: int = 0,
               device: str = "cpu") -> float:
    """Seconds for ``steps`` steps of :class:`NaivePC` (after ``warmup`` untimed ones)."""
    model = NaivePC(math.prod(data.input_shape), width, data.n_classes, T, lr, seed, device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    train = shuffled_steps(lambda idx: model.step(x[idx], y[idx]).item(), len(x), seed, device)
    if warmup:
        train(warmup)
    return train(steps)


def check_naive(data: Dataset, width: int, T: int, device: str = "cpu") -> dict:
    """Same weights (SP, gamma = 1): naive autograd PC vs mulocal's parallel PC on one batch."""
    net = build("mlp", data.input_shape, data.n_classes, width, preset("sp", "sgd"), depth=DEPTH, K=1, seeds=[0],
                device=device)
    naive = NaivePC(math.prod(data.input_shape), width, data.n_classes, T, lr=0.0, device=device)
    with torch.no_grad():
        for layer, lin in zip(net.layers, naive.layers):
            lin.weight.copy_(layer.weight[0])
            lin.bias.copy_(layer.bias[0])
    x, y = data.x_train[:BATCH].to(device), data.y_train[:BATCH].to(device)
    grads_mu, _ = PC(T=T, inference="parallel", fpa=False, kappa=1.0).step(net, x, y)  # the naive loop's step
    naive.compute_grads(x, y)
    grads_nv = [p.grad for lin in naive.layers for p in (lin.weight, lin.bias)]
    diff = max((gm[0] - gn).abs().max().item() for gm, gn in zip(grads_mu, grads_nv))
    scale = max(gm.abs().max().item() for gm in grads_mu)
    return dict(width=width, T=T, max_abs_grad_diff=diff, max_abs_grad=scale, rel=diff / scale if scale else diff)
