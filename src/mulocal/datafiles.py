"""Dataset files on disk: the IDX (FashionMNIST, MNIST) and CIFAR-10 (python pickles) formats, where they are
looked up, how they are downloaded and checked, and their raw arrays (``data.load_dataset`` turns them into tensors).

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
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError, check_choice

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


def check_name(name: str) -> str:
    """``name`` if it is one of DATASETS, else a ConfigError naming them."""
    return check_choice("dataset", name, DATASETS, as_repr=True)


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
    if check_name(name) == "synthetic":
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
    if check_name(name) == "synthetic":
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


def locate(name: str, data_dir, download: bool) -> Path:
    """The folder of ``name`` (:func:`find_data_dir`); if it is nowhere and ``download``, :func:`fetch` it."""
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


def check(name: str, data_dir=None) -> dict:
    """Report which files of ``name`` were found and whether each one reads correctly."""
    if check_name(name) == "synthetic":
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


# ---------------------------------------------------------------------------------------------- arrays
def _load_idx_set(name: str, d: Path) -> tuple[np.ndarray, ...]:
    arrays = [read_idx(_idx_path(d, stem)) for stem in _IDX_FILES]
    for (xs, ys), split in ((arrays[:2], "train"), (arrays[2:], "t10k")):
        if xs.ndim != 3 or ys.ndim != 1 or xs.dtype != np.uint8:
            raise DataError(f"{name} {split} files in {d} have shapes {xs.shape}/{ys.shape}, expected (N,H,W)/(N,)")
        if len(xs) != len(ys):
            raise DataError(f"{name} {split} files in {d} disagree: {len(xs)} images but {len(ys)} labels")
    return arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3]


def read_arrays(name: str, d: Path) -> tuple[np.ndarray, ...]:
    """Raw uint8 images and int64 labels of folder ``d``: (train images, train labels, test images, test labels);
    a DataError (with how to get the data) if a file is unreadable or a label is outside 0..9."""
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
    return xtr, ytr, xte, yte
