"""Modules a user may put in a model: ``Residual`` (a residual block whose branch mulocal can see)."""
from __future__ import annotations

from torch import nn


class Residual(nn.Module):
    """x + branch(x), branch = nn.Sequential(*modules). Any module that adds its input to a branch is read as a
    residual block (``adapter.read.is_residual``); this one also shows mulocal its branch, so a branch of
    parameter-free modules and one Linear / Conv2d runs as the native residual layer."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.branch = nn.Sequential(*modules)

    def forward(self, x):
        return x + self.branch(x)
