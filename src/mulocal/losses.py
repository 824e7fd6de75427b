"""Output losses and their gradient with respect to the output f (closed form, no autograd).

Per sample: cross-entropy  l = -log softmax(f)_y,       dl/df = softmax(f) - onehot(y)
            MSE            l = 1/2 ||f - onehot(y)||^2,  dl/df = f - onehot(y)
Reported losses are batch means per replica, shape (K,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import check_choice, choice_error

LOSSES = ("ce", "mse")


def check_loss(kind: str) -> str:
    return check_choice("loss", kind, LOSSES)


def labels(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Labels as (K, B) int64, accepting shared (B,) labels."""
    y = y.to(f.device)
    return y.unsqueeze(0).expand(f.shape[0], -1) if y.dim() == 1 else y


def onehot(y: torch.Tensor, n_classes: int, dtype) -> torch.Tensor:
    """One-hot rows (..., n_classes) of labels ``y``, by a scatter: no host read (F.one_hot reads the labels'
    min and max back to check them, two device syncs per call; the data loaders check labels once, at load)."""
    return torch.zeros(*y.shape, n_classes, dtype=dtype, device=y.device).scatter_(-1, y.unsqueeze(-1), 1.0)


def loss_and_grad(f: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-mean loss per replica (K,) and the per-sample gradient dl/df (K, B, C)."""
    y = labels(f, y)
    target = onehot(y, f.shape[-1], f.dtype)
    if kind == "ce":
        logp = torch.log_softmax(f, -1)
        loss = -(logp * target).sum(-1).mean(-1)
        return loss, logp.exp_().sub_(target)
    if kind == "mse":
        diff = f - target
        return 0.5 * diff.pow(2).sum(-1).mean(-1), diff
    raise choice_error("loss", kind, LOSSES)


def loss_value(f: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed (not averaged) loss per replica (K,), for evaluation."""
    y = labels(f, y)
    if kind == "ce":
        return F.cross_entropy(f.transpose(1, 2), y, reduction="none").sum(-1)
    return 0.5 * (f - onehot(y, f.shape[-1], f.dtype)).pow(2).sum((-1, -2))
