"""Shared by the oracle tests: the comparison and the activations written out independently of ``mulocal``.

Tolerance: float64 compositions of O(depth x steps) small products on O(1) numbers; rounding is ~1e-15 relative,
so 1e-10 (relative to the reference's largest entry) leaves orders of margin while any equation error (an O(1)
relative change) fails it.
"""
from __future__ import annotations

import torch

RTOL = 1e-10
PHI = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda u: u}


def close(a, b, rtol=RTOL, scale=None):
    """(max |a - b| <= rtol * max |b|, the relative error); ``scale`` replaces max |b| where the reference can be
    ~0 (e.g. a residual at an exact fixed point, a gradient that cancels exactly)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = torch.as_tensor(scale if scale is not None else b.abs().max(), dtype=torch.float64).clamp_min(1e-300)
    return bool((a - b).abs().max() <= rtol * scale), float((a - b).abs().max() / scale)
