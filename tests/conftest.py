import pytest
import torch

from mulocal.data import synthetic_teacher


@pytest.fixture(scope="session")
def synth():
    """A small synthetic teacher task (no files needed)."""
    return synthetic_teacher(n_train=1024, n_test=256, d=32, n_classes=10, seed=0)


@pytest.fixture(scope="session")
def fmnist():
    """Real FashionMNIST; the setup installs it, so its absence is a failure, not a skip."""
    from mulocal.data import load_dataset
    return load_dataset("fashion-mnist", download=False)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
