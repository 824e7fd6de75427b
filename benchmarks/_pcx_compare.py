"""mulocal against PCX in ``bench_pc.py``'s section 2: mulocal's side of the agreement check, how far two runs are
apart, and the PCX child process (``_pcx_side.py``, run with a Python that has PCX and JAX; nothing here imports
JAX). Both sides start from the same weights and train the same batches; their losses and weights must agree to
``AGREE_RTOL`` relative before any timing is compared.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from _common import PCXSide as _PCXChild
from _common import BATCH, DEPTH
from mulocal.algos.pc import PC
from mulocal.data import Dataset
from mulocal.nets import build
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset

PCX_WIDTH, PCX_T = 512, 5
AGREE_RTOL = 1e-4  # mulocal and PCX must compute the same losses (and weights) to this, relative
PCX_SIDE = Path(__file__).resolve().parent / "_pcx_side.py"
PCX_TIME_SAMPLES = 16384  # training samples the PCX side draws its shuffled batches from (its gather costs the same)


def pcx_rule(h_lr: float) -> PC:
    """mulocal's PC of the PCX comparison: T = 5 parallel steps of size h_lr, its other defaults."""
    return PC(T=PCX_T, inference="parallel", kappa=h_lr)


def agreement(ours, theirs) -> dict:
    """How far two sequences of numbers (losses, weights flattened) are apart: the largest absolute difference,
    and relative to the largest magnitude of ``theirs`` (so one value near 0 does not blow the ratio up)."""
    a = torch.as_tensor(ours, dtype=torch.float64).flatten()
    b = torch.as_tensor(theirs, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"cannot compare {tuple(a.shape)} numbers with {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return dict(max_abs=math.inf, max_rel=math.inf, n=a.numel())
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return dict(max_abs=diff, max_rel=diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf), n=a.numel())


def _flat(arrays) -> torch.Tensor:
    """numpy arrays -> one flat float64 tensor."""
    return torch.cat([torch.as_tensor(a, dtype=torch.float64).flatten() for a in arrays])


def agrees(check: dict, rtol: float = AGREE_RTOL) -> bool:
    """Whether an :func:`agreement` is within ``rtol`` relative (nan and inf never agree)."""
    return check["max_rel"] <= rtol


def mulocal_check(data: Dataset, width: int, h_lr: float, lr: float, steps: int, device: str = "cpu"):
    """(initial weights, feed-forward loss of each of ``steps`` training steps on the first batches in order,
    weights after them): mulocal's side of the agreement check (SP, K = 1, seed 0), numpy arrays of layer order
    W1 b1 W2 b2 W3 b3."""
    net = build("mlp", data.input_shape, data.n_classes, width, preset("sp", "sgd"), depth=DEPTH, K=1, seeds=[0],
                device=device)
    init = [p[0].detach().cpu().numpy().copy() for p in net.params()]
    rule, opt = pcx_rule(h_lr), LayerwiseOptimizer.for_net(net, [lr], "sgd")
    losses = []
    for s in range(steps):
        sl = slice(s * BATCH, (s + 1) * BATCH)
        grads, loss = rule.step(net, data.x_train[sl].to(device), data.y_train[sl].to(device))
        opt.step(grads)
        losses.append(float(loss[0]))
    return init, losses, [p[0].detach().cpu().numpy() for p in net.params()]


class PCXSide(_PCXChild):
    """The PCX child process (``_pcx_side.py`` run with ``python``): ``_common.PCXSide``'s protocol."""

    def __init__(self, python: str, npz: Path, out: Path):
        super().__init__(python, PCX_SIDE, npz, out)


def start_pcx(python: str, data: Dataset, tmp: Path, init: list, h_lr: float, lr: float, check_steps: int) -> PCXSide:
    """Write the .npz (initial weights, the check batches, the timing samples, the settings) and start PCX."""
    import numpy as np
    n_time = min(len(data.x_train), PCX_TIME_SAMPLES)
    flat = data.x_train.flatten(1)
    names = ("W1", "b1", "W2", "b2", "W3", "b3")
    npz = tmp / "pcx_input.npz"
    np.savez(npz, **dict(zip(names, init)),
             x_check=flat[:check_steps * BATCH].view(check_steps, BATCH, -1).float().numpy(),
             y_check=data.y_train[:check_steps * BATCH].view(check_steps, BATCH).numpy(),
             x_time=flat[:n_time].float().numpy(), y_time=data.y_train[:n_time].numpy(),
             T=PCX_T, h_lr=h_lr, w_lr=lr, batch=BATCH)
    return PCXSide(python, npz, tmp / "pcx_after_check.npz")
