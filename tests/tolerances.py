"""Tolerances derived from the computation, in one place: never fitted to a value observed once.

Bitwise (``==``) only where the same kernels run on the same shapes: a resumed run vs an uninterrupted one, a
rerun, ``sync_every=N`` vs every step, two executors given the same batches with one thread each.

Anywhere else the kernels may differ and so may the roundings: K replicas batched vs one run alone (a (K, B, n)
product may take another blocking, vector width or summation order than a (1, B, n) one), another CPU (AVX-512,
AVX2, or none: ``ATEN_CPU_CAPABILITY=default``, under which tests/test_cpu_kernels.py reruns the golden and
identity tests), another thread count. Every rounding is at most the unit roundoff u of its dtype (2^-24 float32,
2^-53 float64); a chain of n dependent roundings on O(1)-conditioned data moves a result by at most
gamma_n = n u / (1 - n u) relative (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemma 3.1;
a sum or dot product of length m is a chain of m), so two evaluations with different kernels, each within
gamma_n of the exact value, lie within 2 gamma_n of each other; a condition number multiplies it. A real bug (a
replica index off by one, a shared stream, a dropped term) moves results by O(1), orders of magnitude above these.
"""
from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def chain_rtol(dtype: torch.dtype, n_ops: int, cond: float = 1.0) -> float:
    """How far apart (relative) two evaluations of a chain of ``n_ops`` dependent roundings in ``dtype`` may lie
    when their kernels differ: 2 cond gamma_n (module docstring)."""
    nu = n_ops * UNIT_ROUNDOFF[dtype]
    if not nu < 0.5:
        raise ValueError(f"{n_ops} roundings in {dtype}: no useful bound (n u = {nu:.2g})")
    return 2.0 * cond * nu / (1.0 - nu)


def train_ops(steps: int, depth: int, inner: int) -> int:
    """The length of the rounding chain of ``steps`` training steps of a ``depth``-layer net: one step is a
    forward and a backward pass through every layer, each a sum of at most ``inner`` products (the widest fan-in,
    a convolution's C k^2, or the batch, summed over in a weight gradient) and a few elementwise operations (the
    activation, its derivative, the loss, the update: 4); the steps add, as a stable learning rate keeps one
    step's map from weights to weights O(1)-conditioned (rounding errors are carried, not amplified)."""
    return steps * 2 * depth * (inner + 4)


def fit_atol(xs, y_err: float) -> tuple[float, float]:
    """How far the least-squares line y = slope x + intercept moves when each y_i moves by at most ``y_err``
    (absolute: a slope near 0 has no relative precision). The slope is sum_i w_i y_i with
    w_i = (x_i - mean x) / sum_j (x_j - mean x)^2 and the intercept sum_i (1/n - w_i mean x) y_i, so they move by at
    most y_err sum_i |w_i| and y_err sum_i |1/n - w_i mean x|: the condition of the fit. (slope, intercept)."""
    xs = [float(x) for x in xs]
    n, m = len(xs), sum(xs) / len(xs)
    sxx = sum((x - m) ** 2 for x in xs)
    w = [(x - m) / sxx for x in xs]
    return y_err * sum(abs(v) for v in w), y_err * sum(abs(1 / n - v * m) for v in w)


def assert_close_numbers(a, b, rtol: float, path: str = "$", skip=()) -> None:
    """Two JSON-like records (dicts, lists, numbers, strings) with the same keys and items, floats within ``rtol``
    relative (of the larger magnitude), everything else (ints, strings, flags, statuses) equal; keys in ``skip``
    (e.g. wall-clock times) left out."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) - set(skip) == set(b) - set(skip), (path, a, b)
        for k in set(b) - set(skip):
            assert_close_numbers(a[k], b[k], rtol, f"{path}.{k}", skip)
    elif isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple)) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_numbers(x, y, rtol, f"{path}[{i}]", skip)
    elif isinstance(b, float) and isinstance(a, float):
        assert a == b or abs(a - b) <= rtol * max(abs(a), abs(b)) or (math.isnan(a) and math.isnan(b)), \
            (path, a, b, rtol)
    else:
        assert a == b, (path, a, b)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (norm-wise: the rounding bounds above are relative to the size of the whole result,
    not to an entry that happens to be near 0)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
