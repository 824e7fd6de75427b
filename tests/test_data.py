"""Tests for mulocal.data and mulocal.datafiles: IDX I/O, directory search, loading, splits, CIFAR pickles, synthetic
data."""

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mulocal import datafiles
from mulocal.data import Dataset, load_dataset, synthetic_teacher
from mulocal.datafiles import check, find_data_dir, read_idx, write_idx
from mulocal.errors import ConfigError, DataError

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def make_fake_mnist(folder: Path, n_train=50, n_test=20, gz=True, seed=0) -> Path:
    """Write the four FashionMNIST IDX files with random content into ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}",
                  rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8), gz=gz)
    return folder


def make_fake_cifar(parent: Path, n_per_batch=4, seed=0) -> Path:
    """Write tiny CIFAR-10 pickles into ``parent/cifar-10-batches-py``."""
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, size=n_per_batch)]}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No stray env var, and an empty user cache, for every test."""
    monkeypatch.delenv("MULOCAL_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arr = np.random.default_rng(1).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr, gz=gz)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_gzip_detected_by_magic_not_extension(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "plain-name-ubyte"  # no .gz suffix, gzip content
    write_idx(path, arr, gz=True)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_truncated_idx_names_file(tmp_path):
    path = tmp_path / "cut-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="cut-idx3-ubyte") as err:
        read_idx(path)
    assert "truncated" in str(err.value) and "\n" not in str(err.value)


def test_truncated_gzip_is_data_error(tmp_path):
    path = tmp_path / "cut.gz"
    write_idx(path, np.zeros((40, 28, 28), dtype=np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(path)


def test_wrong_magic_is_data_error(tmp_path):
    path = tmp_path / "bad-magic"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00\x00\x00\x02" + b"ab")
    with pytest.raises(DataError, match="bad-magic"):
        read_idx(path)


def test_fake_fashion_mnist_loads(tmp_path):
    make_fake_mnist(tmp_path)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    assert isinstance(ds, Dataset) and ds.n_classes == 10
    assert ds.x_train.shape == (50, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.input_dim == 784
    assert abs(ds.x_train.mean().item()) < 1e-4
    assert abs(ds.x_train.std().item() - 1.0) < 1e-3
    assert ds.x_val is None and ds.source == str(tmp_path)
    raw = load_dataset("fashion-mnist", data_dir=tmp_path, download=False, normalize=False)
    assert 0.0 <= raw.x_train.min().item() and raw.x_train.max().item() <= 1.0
    assert raw.x_train.mean().item() > 0.3  # uniform bytes scaled to [0,1]


def test_plain_idx_files_load(tmp_path):
    make_fake_mnist(tmp_path, gz=False)
    assert load_dataset("mnist", data_dir=tmp_path, download=False).x_train.shape == (50, 1, 28, 28)


def test_val_split_and_subsets(tmp_path):
    make_fake_mnist(tmp_path)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, download=False, val_fraction=0.2)
    assert len(ds.x_val) == len(ds.y_val) == 10 and len(ds.x_train) == len(ds.y_train) == 40
    full = load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    # train and val are disjoint and together make up the whole training set
    rows = {tuple(r.flatten()[:16].tolist()) for r in torch.cat([ds.x_train, ds.x_val])}
    assert len(rows) == 50 == len({tuple(r.flatten()[:16].tolist()) for r in full.x_train})

    def sub(seed):
        return load_dataset("fashion-mnist", data_dir=tmp_path, download=False, seed=seed,
                            train_subset=15, test_subset=7)

    a, b, c = sub(0), sub(0), sub(1)
    assert a.x_train.shape[0] == 15 and a.x_test.shape[0] == 7
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_test, c.x_test)


def test_bad_arguments_are_config_errors(tmp_path):
    make_fake_mnist(tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset 'foo'.*fashion-mnist, mnist, cifar10, synthetic"):
        load_dataset("foo")
    with pytest.raises(ConfigError):
        load_dataset("fashion-mnist", data_dir=tmp_path, val_fraction=1.5)
    with pytest.raises(ConfigError):
        load_dataset("fashion-mnist", data_dir=tmp_path, train_subset=1000)


def test_label_image_mismatch(tmp_path):
    make_fake_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(49, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match="50 images but 49 labels"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


def test_labels_out_of_range(tmp_path):
    make_fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 12, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match="outside 0..9"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


def test_missing_files_no_download(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", data_dir=empty, download=False)
    assert str(empty) in str(err.value) and "\n" not in str(err.value)


def test_download_failure_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datafiles.urllib.request, "urlopen", offline)
    target = tmp_path / "dl"
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=target, download=True)
    msg = str(err.value)
    assert "could not download" in msg and "network is unreachable" in msg
    assert "dataset-fashion-mnist" in msg and str(target) in msg
    assert not [p for p in target.iterdir() if p.name.endswith(".part")]


def serve_from(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """Make urllib serve ``files`` (keyed by URL basename) and record the requested URLs."""
    requested = []

    def fake_urlopen(url, timeout=None):
        assert timeout is not None
        requested.append(url)
        return io.BytesIO(files[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(datafiles.urllib.request, "urlopen", fake_urlopen)
    return requested


def test_fetch_idx_downloads_validates_and_skips(tmp_path, monkeypatch):
    src = make_fake_mnist(tmp_path / "mirror")
    requested = serve_from(monkeypatch, {p.name: p.read_bytes() for p in src.iterdir()})
    dest = tmp_path / "dest"
    assert datafiles.fetch("fashion-mnist", data_dir=dest) == dest
    assert len(requested) == 4 and all(u.startswith("http://fashion-mnist.s3-website") for u in requested)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in src.iterdir())  # no .part left
    assert load_dataset("fashion-mnist", data_dir=dest, download=False).x_train.shape[0] == 50
    datafiles.fetch("fashion-mnist", data_dir=dest)
    assert len(requested) == 4  # already present and valid: nothing downloaded


def test_fetch_rejects_corrupt_download(tmp_path, monkeypatch):
    serve_from(monkeypatch, {"train-images-idx3-ubyte.gz": b"<html>not found</html>"})
    with pytest.raises(DataError, match="downloaded data is unusable.*train-images-idx3-ubyte.gz"):
        datafiles.fetch("mnist", data_dir=tmp_path / "dest")


def test_fetch_cifar_extracts_archive(tmp_path, monkeypatch):
    folder = make_fake_cifar(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    serve_from(monkeypatch, {"cifar-10-python.tar.gz": buf.getvalue()})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    got = datafiles.fetch("cifar10")
    assert got == tmp_path / "cache" / "mulocal" / "cifar10" / "cifar-10-batches-py"
    assert load_dataset("cifar10", download=False).x_test.shape == (4, 3, 32, 32)


def test_env_var_honoured(tmp_path, monkeypatch):
    parent = tmp_path / "datasets"
    make_fake_mnist(parent / "fashion-mnist", n_train=30)
    monkeypatch.setenv("MULOCAL_DATA_DIR", str(parent))  # parent containing the dataset folder
    assert find_data_dir("fashion-mnist") == parent / "fashion-mnist"
    assert load_dataset("fashion-mnist", download=False).x_train.shape[0] == 30
    direct = make_fake_mnist(tmp_path / "direct", n_train=12)
    monkeypatch.setenv("MULOCAL_DATA_DIR", str(direct))  # the dataset folder itself
    assert load_dataset("fashion-mnist", download=False).x_train.shape[0] == 12


def test_check_reports_files(tmp_path):
    make_fake_mnist(tmp_path)
    report = check("fashion-mnist", data_dir=tmp_path)
    assert report["ok"] and report["dir"] == str(tmp_path)
    assert report["files"]["train-images-idx3-ubyte.gz"] == {"ok": True, "shape": [50, 28, 28]}
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    report = check("fashion-mnist", data_dir=tmp_path)
    assert not report["ok"] and not report["files"]["t10k-images-idx3-ubyte.gz"]["ok"]


def test_fake_cifar_loads(tmp_path):
    folder = make_fake_cifar(tmp_path)
    for d in (tmp_path, folder):  # the parent or the batches folder itself
        ds = load_dataset("cifar10", data_dir=d, download=False)
        assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
        assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    per_channel = ds.x_train.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)


def test_corrupt_cifar_pickle(tmp_path):
    folder = make_fake_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00(garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_cifar_pickle_with_foreign_global_rejected(tmp_path):
    folder = make_fake_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": print, b"labels": []}, f)
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_synthetic_teacher():
    a, b, c = synthetic_teacher(seed=0), synthetic_teacher(seed=0), synthetic_teacher(seed=1)
    assert a.x_train.shape == (2048, 32) and a.x_test.shape == (512, 32) and a.input_dim == 32
    assert a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train) and not torch.equal(a.y_train, c.y_train)
    assert len(torch.unique(a.y_train)) >= 4
    ds = load_dataset("synthetic", data_dir="/nonexistent", val_fraction=0.25, seed=3)
    assert ds.source == "synthetic" and len(ds.x_val) == 512 and len(ds.x_train) == 1536


@pytest.mark.skipif(not (SYSTEM_FASHION / "train-images-idx3-ubyte.gz").exists()
                    and not (SYSTEM_FASHION / "train-images-idx3-ubyte").exists(),
                    reason="real FashionMNIST not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.n_classes == 10
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [6000] * 10
    assert abs(ds.x_train.mean().item()) < 1e-3 and abs(ds.x_train.std().item() - 1) < 1e-3
