"""Datasets: FashionMNIST / MNIST (IDX files), CIFAR-10 (python pickles) and a synthetic teacher task.

Files are looked up locally (explicit directory, ``$MULOCAL_DATA_DIR``, a system directory such as
Debian's ``/usr/share/datasets/fashion-mnist``, the user cache) and optionally downloaded with
:func:`fetch`.  Every failure is a :class:`DataError` or :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import shutil
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mulocal.errors import ConfigError, DataError
from mulocal.streams import generator

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist"), "mnist": Path("/usr/share/datasets/mnist")}
_MIRRORS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}
_HINTS = {
    "fashion-mnist": "install Debian's dataset-fashion-mnist package, run `mulocal data fetch fashion-mnist`, or pass --data-dir",
    "mnist": "run `mulocal data fetch mnist` or pass --data-dir (a folder with the four MNIST IDX files)",
    "cifar10": f"run `mulocal data fetch cifar10` or pass --data-dir (the {_CIFAR_FOLDER} folder or its parent)",
}
# IDX type code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
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


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name


# ----------------------------------------------------------------------------------------- IDX files
def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain, detected by magic bytes) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated (header needs {header} bytes, file has {len(raw)})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {what} ({len(raw)} bytes, expected {expected} for shape {dims})")
    return np.frombuffer(bytearray(raw), dtype=dtype, offset=header).reshape(dims)  # bytearray: writable


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """Write ``array`` as an IDX file (optionally gzip-compressed)."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0:
        raise ConfigError(f"cannot write dtype {array.dtype} with {array.ndim} dims as IDX")
    payload = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload += np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(payload, compresslevel=6) if gz else payload)


def _idx_path(directory: Path, stem: str) -> Path | None:
    for p in (directory / stem, directory / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


# ------------------------------------------------------------------------------------------ CIFAR-10
class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only allows the few numpy globals a CIFAR batch needs (no arbitrary code)."""

    _ALLOWED = {("multiarray", "_reconstruct"), ("numeric", "_frombuffer")}

    def find_class(self, module, name):
        if module == "_codecs" and name == "encode":
            import codecs
            return codecs.encode
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        sub = module.rsplit(".", 1)[-1]
        if module.startswith("numpy") and (sub, name) in self._ALLOWED:
            for mod in (f"numpy._core.{sub}", f"numpy.core.{sub}"):
                try:
                    return getattr(importlib.import_module(mod), name)
                except (ImportError, AttributeError):
                    continue
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images (N,3,32,32) uint8, labels (N,) int64)`` from one CIFAR-10 pickle."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyUnpickler(f, encoding="bytes").load()
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
    except Exception as e:  # pickle, EOF, attribute and conversion errors all mean a bad file
        raise DataError(f"corrupt CIFAR-10 batch {path} ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR-10 batch {path} has data {data.shape} / labels {labels.shape}, expected (N, 3072) / (N,)")
    return data.reshape(-1, 3, 32, 32), labels


# --------------------------------------------------------------------------------- locating the files
def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mulocal"


def _candidates(name: str, data_dir=None) -> list[Path]:
    """Directories to search, in order.

    An explicit ``data_dir`` is the only place searched (a wrong --data-dir should fail, not silently fall
    back); otherwise ``$MULOCAL_DATA_DIR``, the system directory and the user cache, in that order. User
    supplied folders may be the dataset folder itself or its parent; for CIFAR-10 also the parent of
    ``cifar-10-batches-py``.
    """
    env = os.environ.get("MULOCAL_DATA_DIR")
    user = [Path(data_dir).expanduser()] if data_dir is not None else [Path(env).expanduser()] if env else []
    dirs = [d for root in user for d in (root, root / name)]
    if data_dir is None:
        dirs += [_SYSTEM_DIRS[name]] if name in _SYSTEM_DIRS else []
        dirs.append(_cache_root() / name)
    if name == "cifar10":
        dirs = [c for d in dirs for c in (d, d / _CIFAR_FOLDER)]
    return list(dict.fromkeys(dirs))


def _has_files(name: str, d: Path) -> bool:
    if name == "cifar10":
        return all((d / f).is_file() for f in _CIFAR_FILES)
    return all(_idx_path(d, stem) is not None for stem in _IDX_FILES)


def find_data_dir(name: str, data_dir=None) -> Path:
    """Return the first directory holding all files of ``name``; DataError lists where it looked."""
    if _check_name(name) == "synthetic":
        raise ConfigError("the synthetic dataset is generated in memory and has no data directory")
    looked = _candidates(name, data_dir)
    for d in looked:
        if _has_files(name, d):
            return d
    raise DataError(f"{name} data not found (looked in: {', '.join(map(str, looked))}); {_HINTS[name]}")


# ---------------------------------------------------------------------------------------- downloading
def _download(url: str, dest: Path, timeout: float, name: str) -> None:
    """Download ``url`` to ``dest`` atomically (temp file in the same folder, then rename)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.replace(tmp, dest)
    except Exception as e:  # URLError, timeouts, HTTP errors, disk errors
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download {url}: {reason}; {_HINTS[name]}") from None


def _validate_download(name: str, paths: list[Path]) -> None:
    try:
        for p in paths:
            _read_cifar_batch(p) if name == "cifar10" else read_idx(p)
    except DataError as e:
        raise DataError(f"downloaded data is unusable: {e}; delete it and retry, or {_HINTS[name]}") from None


def fetch(name: str, data_dir=None, timeout: float = 30.0) -> Path:
    """Download ``name`` into ``data_dir`` (default: the user cache) unless valid files are already there."""
    if _check_name(name) == "synthetic":
        raise ConfigError("the synthetic dataset is generated in memory; there is nothing to fetch")
    dest = Path(data_dir).expanduser() if data_dir is not None else _cache_root() / name
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data directory {dest}: {e}; {_HINTS[name]}") from None
    if name == "cifar10":
        folder = dest if _has_files(name, dest) else dest / _CIFAR_FOLDER
        if not _has_files(name, folder):
            archive = dest / "cifar-10-python.tar.gz"
            _download(_MIRRORS[name], archive, timeout, name)
            tmp = dest / f".{_CIFAR_FOLDER}.{os.getpid()}.part"
            try:  # copy only the batch files (by base name: no path tricks), then swap the folder in
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                with tarfile.open(archive) as tar:
                    for m in tar.getmembers():
                        if m.isfile() and m.name.count("/") == 1 and m.name.startswith(_CIFAR_FOLDER + "/"):
                            with tar.extractfile(m) as src, open(tmp / Path(m.name).name, "wb") as out:
                                shutil.copyfileobj(src, out)
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
                raise DataError(f"could not extract {archive}: {e}; {_HINTS[name]}") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            archive.unlink(missing_ok=True)
        _validate_download(name, [folder / f for f in _CIFAR_FILES])
        return folder
    for stem in _IDX_FILES:
        path = _idx_path(dest, stem)
        if path is not None:
            try:
                read_idx(path)
                continue
            except DataError:
                path.unlink(missing_ok=True)
        _download(_MIRRORS[name] + stem + ".gz", dest / f"{stem}.gz", timeout, name)
        _validate_download(name, [dest / f"{stem}.gz"])
    return dest


def check(name: str, data_dir=None) -> dict:
    """Report which files of ``name`` were found and whether each one reads correctly."""
    if _check_name(name) == "synthetic":
        return {"name": name, "dir": "synthetic", "files": {}, "ok": True}
    d = find_data_dir(name, data_dir)
    files: dict[str, dict] = {}
    for stem in (_CIFAR_FILES if name == "cifar10" else _IDX_FILES):
        path = d / stem if name == "cifar10" else _idx_path(d, stem)
        try:
            shape = _read_cifar_batch(path)[0].shape if name == "cifar10" else read_idx(path).shape
            files[path.name] = {"ok": True, "shape": list(shape)}
        except DataError as e:
            files[path.name] = {"ok": False, "shape": [], "error": str(e)}
    return {"name": name, "dir": str(d), "files": files, "ok": all(f["ok"] for f in files.values())}


# -------------------------------------------------------------------------------------------- loading
def _load_idx_set(name: str, d: Path) -> tuple[np.ndarray, ...]:
    arrays = [read_idx(_idx_path(d, stem)) for stem in _IDX_FILES]
    for (xs, ys), split in ((arrays[:2], "train"), (arrays[2:], "t10k")):
        if xs.ndim != 3 or ys.ndim != 1 or xs.dtype != np.uint8:
            raise DataError(f"{name} {split} files in {d} have shapes {xs.shape}/{ys.shape}, expected (N,H,W)/(N,)")
        if len(xs) != len(ys):
            raise DataError(f"{name} {split} files in {d} disagree: {len(xs)} images but {len(ys)} labels")
    return arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3]


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
        try:
            if name == "cifar10":
                tr = [_read_cifar_batch(d / f) for f in _CIFAR_FILES[:-1]]
                xtr, ytr = np.concatenate([b[0] for b in tr]), np.concatenate([b[1] for b in tr])
                xte, yte = _read_cifar_batch(d / "test_batch")
            else:
                xtr, ytr, xte, yte = _load_idx_set(name, d)
            ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
            for y, split in ((ytr, "train"), (yte, "test")):
                if y.size and (y.min() < 0 or y.max() >= 10):
                    raise DataError(f"{name} {split} labels in {d} are outside 0..9 (min {y.min()}, max {y.max()})")
        except DataError as e:
            raise DataError(f"{e}; {_HINTS[name]}") from None
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


def _locate(name: str, data_dir, download: bool) -> Path:
    try:
        return find_data_dir(name, data_dir)
    except DataError as not_found:
        if not download:
            raise
        try:
            return fetch(name, data_dir)
        except DataError as failed:
            looked = ", ".join(map(str, _candidates(name, data_dir)))
            raise DataError(f"{name} data not found (looked in: {looked}) and download failed: {failed}") from not_found


def load_dataset(name: str, data_dir=None, *, val_fraction: float = 0.0, train_subset: int | None = None,
                 test_subset: int | None = None, seed: int = 0, download: bool = True,
                 normalize: bool = True) -> Dataset:
    """Load ``name`` with an optional seeded validation split and seeded train/test subsets.

    Image pixels are scaled to [0, 1] and, if ``normalize``, standardized with the full training set's
    mean/std (global for MNIST-like data, per channel for CIFAR-10). The returned tensors are fresh copies.
    """
    _check_name(name)
    _check_split_args(val_fraction, train_subset, test_subset)
    if name == "synthetic":
        ds = synthetic_teacher(seed=seed)
        v, tr, te = _split_indices(len(ds.x_train), len(ds.x_test), val_fraction, train_subset, test_subset, seed)
        take = lambda t, i: t if i is None else t[i]  # noqa: E731
        x_val, y_val = (None, None) if v is None else (ds.x_train[v], ds.y_train[v])
        return Dataset(name, take(ds.x_train, tr), take(ds.y_train, tr), take(ds.x_test, te), take(ds.y_test, te),
                       ds.n_classes, x_val, y_val, source="synthetic")
    d = _locate(name, data_dir, download)
    xtr, ytr, xte, yte, mean, std = _load_raw(name, d, normalize)
    val_idx, train_idx, test_idx = _split_indices(len(xtr), len(xte), val_fraction, train_subset, test_subset, seed)
    x_train, y_train = _to_tensors(xtr, ytr, train_idx, mean, std)
    x_test, y_test = _to_tensors(xte, yte, test_idx, mean, std)
    x_val, y_val = _to_tensors(xtr, ytr, val_idx, mean, std) if val_idx is not None else (None, None)
    return Dataset(name, x_train, y_train, x_test, y_test, 10, x_val, y_val, source=str(d))
