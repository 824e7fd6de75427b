"""Contracts the mutation check found unguarded (tests/mutants/catalogue.toml names the mutant each one kills).

Each compares the code with something independent of it: torch.optim, a forward pass written out here and
differentiated by autograd, a loss and an accuracy computed by hand, or the store's documented semantics.
"""
import math
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mulocal.algos import make_algo
from mulocal.config import config_hash, default_cell
from mulocal.nets import build
from mulocal.param import Parameterization, preset
from mulocal.sweep.store import Store
from mulocal.train import evaluate


# ------------------------------------------------------------------------------------------ optimizer
# (weight decay against torch.optim: tests/test_identities.py::test_optimizer_matches_torch)


# ------------------------------------------------------------------------------------------ multipliers
def _mults(p: Parameterization, width: int) -> list[float]:
    """m^-(a - a_SP) per role, a_SP = 0 (the documented formula, evaluated here)."""
    m = width / p.base_width
    return [m ** -p.a[0], m ** -p.a[1], m ** -p.a[2]]


A_PARAM = Parameterization(name="with-multipliers", b=(0, 0.5, 1), c=(0, 1, 1), a=(0.5, 0.5, 1.0), base_width=4)


def _leaves(net):
    return [p.detach().clone().requires_grad_() for p in net.params()]


def test_bp_with_forward_multipliers_equals_autograd_mlp():
    """u_l = mult_l W_l a_{l-1} + b_l written out here; explicit BP = autograd of it (kills nets-*-no-mult)."""
    torch.manual_seed(0)
    width = 16
    net = build("mlp", (5,), 3, width, A_PARAM, K=2, seeds=[0, 1], dtype=torch.float64)
    mults = _mults(A_PARAM, width)
    assert [layer.mult for layer in net.layers] == pytest.approx(mults) and mults == [0.5, 0.5, 0.25]
    x, y = torch.randn(2, 7, 5, dtype=torch.float64), torch.randint(0, 3, (2, 7))
    W1, b1, W2, b2, W3, b3 = leaves = _leaves(net)
    h1 = torch.tanh(mults[0] * x @ W1.transpose(1, 2) + b1[:, None])
    h2 = torch.tanh(mults[1] * h1 @ W2.transpose(1, 2) + b2[:, None])
    f = mults[2] * h2 @ W3.transpose(1, 2) + b3[:, None]
    loss = -torch.log_softmax(f, -1).gather(-1, y[..., None]).squeeze(-1).mean(-1)  # batch mean per replica
    ref = torch.autograd.grad(loss.sum(), leaves)
    grads, lossval = make_algo("bp").step(net, x, y)
    assert torch.allclose(lossval.double(), loss.detach(), rtol=1e-12)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12), (g - r).abs().max()


def test_bp_with_forward_multipliers_equals_autograd_cnn():
    """The CNN written out per replica (conv, tanh, 2x2 max-pool, readout, each scaled by its multiplier)."""
    torch.manual_seed(0)
    width, k = 8, 3
    net = build("cnn", (2, 8, 8), 3, width, A_PARAM, K=2, seeds=[0, 1], dtype=torch.float64)
    mults = _mults(A_PARAM, width)
    x, y = torch.randn(2, 5, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (2, 5))
    W1, b1, W2, b2, W3, b3 = leaves = _leaves(net)
    losses = []
    for r in range(2):
        h = torch.tanh(mults[0] * F.conv2d(x[r], W1[r], padding=k // 2) + b1[r][None, :, None, None])
        h = F.max_pool2d(h, 2)
        h = torch.tanh(mults[1] * F.conv2d(h, W2[r], padding=k // 2) + b2[r][None, :, None, None])
        h = F.max_pool2d(h, 2).flatten(1)
        f = mults[2] * h @ W3[r].T + b3[r]
        losses.append(F.cross_entropy(f, y[r]))
    ref = torch.autograd.grad(sum(losses), leaves)
    grads, lossval = make_algo("bp").step(net, x, y)
    assert torch.allclose(lossval.double(), torch.stack(losses).detach(), rtol=1e-12)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12), (g - r).abs().max()


# ------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_evaluate_is_the_mean_over_all_samples(loss):
    """Mean loss and accuracy over every sample, whatever the evaluation batch (kills train-eval-last-batch)."""
    net = build("mlp", (6,), 4, 16, preset("sp"), K=2, seeds=[0, 1], dtype=torch.float64)
    x, y = torch.randn(23, 6, dtype=torch.float64), torch.randint(0, 4, (23,))
    f = net(x)  # (K, 23, 4)
    onehot = F.one_hot(y, 4).double()
    if loss == "ce":
        per = -(torch.log_softmax(f, -1) * onehot).sum(-1)
    else:
        per = 0.5 * ((f - onehot) ** 2).sum(-1)
    acc = (f.argmax(-1) == y).double().mean(-1)
    out = evaluate(net, x, y, loss, batch_size=5)  # 5 batches, the last one short
    assert out["loss"] == pytest.approx(per.mean(-1).tolist(), rel=1e-12)
    assert out["accuracy"] == pytest.approx(acc.tolist(), abs=1e-15)


# ------------------------------------------------------------------------------------------ the store
def _cells(n: int) -> list[dict]:
    return [default_cell(dataset="synthetic", width=16, lr=0.1 * (i + 1), seed=0) for i in range(n)]


def test_store_round_trip_of_finished_cells(tmp_path):
    """What finish() is given is what rows() gives back; epochs_run counts epochs, not events
    (kills store-epochs-count-events)."""
    cells = _cells(2)
    h_done, h_div = (config_hash(c) for c in cells)
    done_hist = [{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.5}]
    div_hist = [{"epoch": 1, "step": 3, "event": "diverged"}, {"epoch": 1, "status": "diverged", "train_loss": math.inf}]
    with Store(tmp_path / "s.sqlite") as st:
        assert st.add_cells(cells) == 2 and st.add_cells(cells) == 0
        assert sorted(st.claim([h_done, h_div])) == sorted([h_done, h_div])
        st.finish([{"hash": h_done, "status": "done", "train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.8,
                    "history": done_hist},
                   {"hash": h_div, "status": "diverged", "train_loss": math.inf, "test_loss": math.inf,
                    "test_accuracy": None, "history": div_hist}], seconds=1.5, replicas=2, host="h")
    with Store(tmp_path / "s.sqlite", create=False) as st:
        rows = {r["hash"]: r for r in st.rows()}
    done, div = rows[h_done], rows[h_div]
    assert (done["status"], done["epochs_run"], done["history"]) == ("done", 2, done_hist)
    assert (done["train_loss"], done["test_loss"], done["test_accuracy"]) == (0.5, 0.6, 0.8)
    assert (div["status"], div["epochs_run"]) == ("diverged", 1)
    assert div["history"][0] == div_hist[0] and div["history"][1]["train_loss"] == math.inf
    assert div["train_loss"] == math.inf and div["test_accuracy"] is None
    assert done["config"] == cells[0] and done["attempts"] == 1 and done["replicas"] == 2 and done["owner"] is None


def test_a_cell_is_claimed_once(tmp_path):
    """Two sweeps on one store never run one cell twice: a running or finished cell cannot be claimed; a failed
    one can (kills store-claim-running)."""
    a, b, c = (config_hash(x) for x in _cells(3))
    with Store(tmp_path / "s.sqlite") as st:
        st.add_cells(_cells(3))
        assert st.claim([a], owner="h:1") == [a]
        assert st.claim([a, b], owner="h:2") == [b]  # a is running elsewhere
        assert st.claim([a, b], owner="h:3") == []
        st.finish([{"hash": a, "status": "done", "history": []}])
        st.fail([b], "boom")
        assert st.claim([a, b, c], owner="h:4") == [b, c]  # done stays done; failed is retried
        assert st.counts() == {"pending": 0, "running": 2, "done": 1, "diverged": 0, "failed": 0}


def test_reset_stale_takes_over_only_dead_runners(tmp_path):
    """Cells held by a live process on this host stay running; a dead one's go back to pending; ``force`` takes
    all (kills store-reset-live-owner)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    try:
        a, b = (config_hash(x) for x in _cells(2))
        with Store(tmp_path / "s.sqlite") as st:
            st.add_cells(_cells(2))
            assert st.claim([a], owner=f"{host}:{live.pid}") == [a]
            assert st.claim([b], owner=f"{host}:{dead.pid}") == [b]
            assert st.reset_stale() == 1
            status = {r["hash"]: r["status"] for r in st.rows(columns=("hash", "status"))}
            assert status == {a: "running", b: "pending"}
            assert st.reset_stale(force=True) == 1 and st.counts()["running"] == 0
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------ memory planning
@pytest.mark.parametrize("arch,shape,depth", [("mlp", (7,), 3), ("mlp", (1, 6, 6), 4), ("cnn", (2, 8, 8), 3),
                                              ("cnn", (1, 12, 12), 4), ("resmlp", (7,), 5), ("rescnn", (2, 8, 8), 5),
                                              ("rescnn", (1, 10, 10), 4)])  # an odd stream side (5 x 5)
@pytest.mark.parametrize("bias", [True, False])
def test_planned_sizes_are_the_built_nets(arch, shape, depth, bias):
    """nets.sizes (the sweep's memory plan) = the parameters of the built net and its activations per sample."""
    from mulocal.nets import sizes
    net = build(arch, shape, 5, 6, preset("sp"), depth=depth, bias=bias, seeds=[0])
    params, acts = sizes(arch, shape, 5, 6, depth, bias=bias)
    assert params == sum(p[0].numel() for p in net.params())
    us, _ = net.forward(torch.zeros(1, *shape))
    assert acts == sum(u[0, 0].numel() for u in us[1:])
