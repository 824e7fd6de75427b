"""Datasets as tensors: FashionMNIST / MNIST, CIFAR-10 (their files: ``datafiles.py``) and a synthetic teacher task,
with seeded validation splits and subsets. Every failure is a :class:`DataError` or :class:`ConfigError` with a
one-line message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mulocal.datafiles import check_name, locate, read_arrays
from mulocal.errors import ConfigError
from mulocal.streams import generator

_CACHE: dict[tuple, tuple] = {}  # (name, dir, normalize, file stats) -> raw uint8 arrays, labels, mean, std
_CACHE_MAX = 4


@dataclass
class Dataset:
    """Train/test (and optional validation) tensors of one dataset."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)


# -------------------------------------------------------------------------------------------- loading
def _pixel_stats(x: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean/std of uint8 images scaled to [0, 1] via chunked 256-bin histograms (no big float copy)."""
    counts = np.zeros((x.shape[1] if per_channel else 1, 256))
    for i in range(0, len(x), 1024):
        for c in range(len(counts)):
            block = x[i:i + 1024, c] if per_channel else x[i:i + 1024]
            counts[c] += np.bincount(block.ravel(), minlength=256)
    v = np.arange(256) / 255.0
    n = counts.sum(axis=1)
    mean = counts @ v / n
    std = np.sqrt(np.maximum(counts @ (v * v) / n - mean**2, 0.0))
    return mean, np.maximum(std, 1e-8)


def _load_raw(name: str, d: Path, normalize: bool) -> tuple:
    """Raw uint8 images, int64 labels and (mean, std) of ``d``, memoized per (name, dir, normalize, file stats)."""
    stats = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(d.iterdir()) if p.is_file())
    key = (name, str(d.resolve()), normalize, stats)
    if key not in _CACHE:
        xtr, ytr, xte, yte = read_arrays(name, d)
        mean, std = _pixel_stats(xtr, per_channel=name == "cifar10") if normalize else (np.zeros(1), np.ones(1))
        while len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (xtr, ytr, xte, yte, mean, std)
    return _CACHE[key]


def _to_tensors(x: np.ndarray, y: np.ndarray, idx: torch.Tensor | None, mean, std) -> tuple[torch.Tensor, ...]:
    """Select rows ``idx`` (all if None) and return fresh (float32 standardized images, int64 labels)."""
    if idx is not None:
        x, y = x[idx.numpy()], y[idx.numpy()]
    xt = torch.from_numpy(np.require(x, np.uint8, ["C", "W"])).to(torch.float32, copy=True)  # W: no torch warning
    shape = (1, -1) + (1,) * (xt.ndim - 2)
    xt.mul_(torch.tensor(1.0 / (255.0 * std), dtype=torch.float32).reshape(shape))
    xt.sub_(torch.tensor(mean / std, dtype=torch.float32).reshape(shape))
    return xt, torch.from_numpy(np.array(y, dtype=np.int64))


def synthetic_teacher(n_train=2048, n_test=512, d=32, n_classes=10, seed=0, hidden=64) -> Dataset:
    """Gaussian inputs labelled by the argmax of a fixed random tanh MLP (deterministic given ``seed``)."""
    for arg, val, lo in (("n_train", n_train, 1), ("n_test", n_test, 1), ("d", d, 1),
                         ("n_classes", n_classes, 2), ("hidden", hidden, 1)):
        if not isinstance(val, int) or val < lo:
            raise ConfigError(f"synthetic_teacher: {arg} must be an integer >= {lo}, got {val!r}")
    g = generator("subset", seed)
    w1 = torch.randn(d, hidden, generator=g) / math.sqrt(d)
    b1 = 0.1 * torch.randn(hidden, generator=g)
    w2 = torch.randn(hidden, n_classes, generator=g) / math.sqrt(hidden)
    x = torch.randn(n_train + n_test, d, generator=g)
    y = (torch.tanh(x @ w1 + b1) @ w2).argmax(dim=1)
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], n_classes, source="synthetic")


def _check_split_args(val_fraction: float, train_subset, test_subset) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for arg, val in (("train_subset", train_subset), ("test_subset", test_subset)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ConfigError(f"{arg} must be a positive integer or None, got {val!r}")


def _split_indices(n_train: int, n_test: int, val_fraction: float, train_subset, test_subset, seed: int):
    """Seeded (val, train, test) row indices; None means "all rows, in order".

    One permutation of the training set (stream ``subset`` of ``streams.py``) gives the validation
    rows first and the (optionally truncated) training rows after them; the test subset uses its own
    generator seeded the same way.
    """
    n_val = max(1, round(val_fraction * n_train)) if val_fraction > 0 else 0
    if n_val >= n_train:
        raise ConfigError(f"val_fraction {val_fraction} leaves no training samples out of {n_train}")
    val_idx = train_idx = test_idx = None
    if n_val or train_subset is not None:
        perm = torch.randperm(n_train, generator=generator("subset", seed))
        val_idx, train_idx = (perm[:n_val] if n_val else None), perm[n_val:]
        if train_subset is not None:
            if train_subset > len(train_idx):
                raise ConfigError(f"train_subset {train_subset} exceeds the {len(train_idx)} available training samples")
            train_idx = train_idx[:train_subset]
    if test_subset is not None:
        if test_subset > n_test:
            raise ConfigError(f"test_subset {test_subset} exceeds the {n_test} test samples")
        test_idx = torch.randperm(n_test, generator=generator("subset", seed))[:test_subset]
    return val_idx, train_idx, test_idx


def load_dataset(name: str, data_dir=None, *, val_fraction: float = 0.0, train_subset: int | None = None,
                 test_subset: int | None = None, seed: int = 0, download: bool = True,
                 normalize: bool = True) -> Dataset:
    """Load ``name`` with an optional seeded validation split and seeded train/test subsets.

    Image pixels are scaled to [0, 1] and, if ``normalize``, standardized with the full training set's
    mean/std (global for MNIST-like data, per channel for CIFAR-10). The returned tensors are fresh copies.
    """
    check_name(name)
    _check_split_args(val_fraction, train_subset, test_subset)
    if name == "synthetic":
        ds = synthetic_teacher(seed=seed)
        v, tr, te = _split_indices(len(ds.x_train), len(ds.x_test), val_fraction, train_subset, test_subset, seed)
        take = lambda t, i: t if i is None else t[i]  # noqa: E731
        x_val, y_val = (None, None) if v is None else (ds.x_train[v], ds.y_train[v])
        return Dataset(name, take(ds.x_train, tr), take(ds.y_train, tr), take(ds.x_test, te), take(ds.y_test, te),
                       ds.n_classes, x_val, y_val, source="synthetic")
    d = locate(name, data_dir, download)
    xtr, ytr, xte, yte, mean, std = _load_raw(name, d, normalize)
    val_idx, train_idx, test_idx = _split_indices(len(xtr), len(xte), val_fraction, train_subset, test_subset, seed)
    x_train, y_train = _to_tensors(xtr, ytr, train_idx, mean, std)
    x_test, y_test = _to_tensors(xte, yte, test_idx, mean, std)
    x_val, y_val = _to_tensors(xtr, ytr, val_idx, mean, std) if val_idx is not None else (None, None)
    return Dataset(name, x_train, y_train, x_test, y_test, 10, x_val, y_val, source=str(d))
