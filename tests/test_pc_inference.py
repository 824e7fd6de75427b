"""Multi-step PC inference: the parallel default step, the energy guard and the inference status (docs/pc.md,
``algos/pc.py``).

A user report: ``--algo pc --T 5 --inference parallel`` reached 0.26 test accuracy on FashionMNIST with the
old default kappa_l = 1/gamma_l, silently (hidden energy growing ~4x per step). Measured with the old default
(``parallel_step="gamma"``) on the setting of the first test below: T = 3, 5, 20 -> 0.583, 0.371, 0.716 against
0.798 for T = 1 sequential (each fails the floor, and the status flags every step); with the derived default
0.794, 0.799, 0.796. With the old default this file has 10 failures (accuracy, status, the step by hand)."""
import dataclasses

import numpy as np
import pytest
import torch

from mulocal.algos.pc import PC
from mulocal.nets import build
from mulocal.optim import DEFAULT_LR
from mulocal.param import preset
from mulocal.train import Trainer, TrainConfig

N_TRAIN = 20000  # one epoch = 157 steps of 128: T = 20 parallel runs in about 3 s on one core


@pytest.fixture
def one_thread():
    """The training tests run on one thread: width-256 products gain nothing from a second one, and on a shared
    2-core machine two threads contend with other processes (measured: one epoch of T = 5, 1.3 s on one thread,
    5-79 s on two while another process was busy). The numbers do not depend on it (same accuracy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fm20k(fmnist):
    return dataclasses.replace(fmnist, x_train=fmnist.x_train[:N_TRAIN], y_train=fmnist.y_train[:N_TRAIN])


def _train(data, algo, width=256, seeds=(0,)):
    net = build("mlp", data.input_shape, 10, width, preset("mup", "sgd"), K=len(seeds), seeds=list(seeds))
    return Trainer(net, algo, data, TrainConfig(epochs=1, lr=DEFAULT_LR["sgd"], progress=False)).run()


@pytest.fixture(scope="module")
def single_shot_accuracy(fm20k):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread (a module-scoped fixture cannot use it)
    try:
        return _train(fm20k, PC())["replicas"][0]["test_accuracy"]
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- (a) accuracy floor
@pytest.mark.parametrize("T", [3, 5, 20])
def test_parallel_inference_with_defaults_trains_as_well_as_single_shot(fm20k, single_shot_accuracy, T, one_thread):
    """PC muP (gbar_L = 0), width 256, one epoch on 20000 FashionMNIST images: parallel inference with its
    default step reaches the accuracy of the default single-shot sequential rule within 0.02, and its status
    says the energy never rose and inference converged (relative residual < 1)."""
    algo = PC(T=T, inference="parallel")
    res = _train(fm20k, algo)
    acc = res["replicas"][0]["test_accuracy"]
    assert single_shot_accuracy > 0.75, single_shot_accuracy
    assert acc >= single_shot_accuracy - 0.02, (T, acc, single_shot_accuracy)
    row = res["replicas"][0]["history"][-1]
    assert row["pc_energy_rose"] == 0.0, row
    assert row["pc_residual"] < 0.6, row


# ----------------------------------------------------------------------------- (b) the guard
def _batch(fmnist, n=128):
    return fmnist.x_train[:n].double(), fmnist.y_train[:n]


@pytest.mark.parametrize("kind", ["sequential-kappa3", "parallel-gamma", "parallel-default"])
def test_guard_never_lets_the_energy_rise(fmnist, kind, one_thread):
    """A FashionMNIST batch, width 256, three replicas (float64): with the guard the recorded energy never rises
    at any step of any replica; without it, the too-large steps make it rise (so the check can fail)."""
    mode, extra = {"sequential-kappa3": ("sequential", dict(kappa=3.0)),
                   "parallel-gamma": ("parallel", dict(parallel_step="gamma")),
                   "parallel-default": ("parallel", {})}[kind]
    net = build("mlp", fmnist.input_shape, 10, 256, preset("mup", "sgd"), K=3, seeds=[0, 1, 2], dtype=torch.float64)
    x, y = _batch(fmnist)
    runs = {}
    for guard in (False, True):
        algo = PC(T=20, inference=mode, guard=guard, record=True, **extra)
        algo.step(net, x, y)
        runs[guard] = (algo.stats["energy"].sum(1), algo)  # (T + 1, K): total energy per step and replica
    E, algo = runs[True]
    assert bool((E[1:] <= E[:-1] * (1 + 1e-12)).all()), E
    assert bool((E[-1] < E[0]).all()), E
    status = algo.inference_status()
    assert status["energy_rose"] == [0.0] * 3
    E0 = runs[False][0]
    if kind == "parallel-default":  # nothing to undo: the same trajectory
        assert status["backtracks"] == [0.0] * 3 and torch.equal(E, E0)
    else:
        assert min(status["backtracks"]) >= 1, status
        assert bool((E0[1:] > E0[:-1]).any(0).all()), E0  # without the guard every replica's energy rises


def test_guard_is_per_replica_and_matches_a_separate_run(fmnist):
    """Replica k with the guard equals a run of replica k alone (the backtracking of one replica does not touch
    the others): K = 2 batched vs K = 1 each, old parallel step (the guard acts)."""
    x, y = _batch(fmnist, 64)
    def run(seeds):
        net = build("mlp", fmnist.input_shape, 10, 64, preset("mup", "sgd"), K=len(seeds), seeds=seeds,
                    dtype=torch.float64)
        algo = PC(T=8, inference="parallel", parallel_step="gamma", guard=True, record=True)
        grads, _ = algo.step(net, x, y)
        return grads, algo.stats["energy"]
    both, E = run([0, 5])
    for k, s in enumerate([0, 5]):
        alone, E1 = run([s])
        for g2, g1 in zip(both, alone):
            assert torch.allclose(g2[k], g1[0], rtol=1e-12, atol=1e-14)
        assert torch.allclose(E[:, :, k], E1[:, :, 0], rtol=1e-12)


@pytest.mark.parametrize("mode,kappa,momentum", [("parallel", 1.0, 0.0), ("sequential", 2.5, 0.0),
                                                 ("parallel", 1.5, 0.5)])
def test_guard_equals_its_documented_rule_on_the_energy_oracle(mode, kappa, momentum):
    """The guard against the autograd energy oracle of test_oracle_pc.py, replica by replica in a Python loop:
    take the documented step with kappa * scale_k; if F did not decrease, put v (and the momentum) back and
    halve scale_k. Small float64 MLP, two replicas, steps large enough that the guard acts."""
    from test_oracle_pc import Energy, _net
    net, x, y = _net("mlp", "tanh", 0.0)
    L, K = net.depth, net.K
    gam = [1.0] * (L - 1) + [(net.width / net.param.base_width) ** -0.0]
    algo = PC(T=6, inference=mode, kappa=kappa, momentum=momentum, guard=True, record=True)
    algo.step(net, x, y)
    oracle = Energy(net, "ce", gam)
    v = [net.post(0, x)] + oracle.feedforward(net.post(0, x))[1:]
    vel = [None] + [torch.zeros_like(t) for t in v[1:]]
    scale = [1.0] * K
    F = oracle.layer_energies(v, y).sum(0)
    undone = 0
    for _ in range(6):
        cand, cvel = list(v), [None] + [q.clone() for q in vel[1:]]
        if mode == "sequential":
            for l in range(L - 1, 0, -1):
                g = oracle.dFdv(cand, y)[l]
                cvel[l] = momentum * cvel[l] + g
                cand[l] = cand[l] - torch.tensor(scale)[:, None, None] * kappa * cvel[l]
        else:
            g = oracle.dFdv(cand, y)
            for l in range(1, L):
                cvel[l] = momentum * cvel[l] + g[l]
                cand[l] = cand[l] - torch.tensor(scale)[:, None, None] * kappa * cvel[l]
        Fc = oracle.layer_energies(cand, y).sum(0)
        for k in range(K):
            if Fc[k] <= F[k]:
                for l in range(1, L):
                    v[l] = v[l].clone()
                    v[l][k], vel[l][k] = cand[l][k], cvel[l][k]
                F[k] = Fc[k]
            else:
                scale[k] /= 2
                undone += 1
    assert undone >= 2
    for l in range(1, L):
        assert torch.allclose(algo._last[0][l], v[l], rtol=1e-10, atol=1e-12), l
    assert algo.stats["step_scale"].tolist() == scale


# ----------------------------------------------------------------------------- (c) the status
def test_status_reports_energy_rise_for_a_too_large_step_and_not_for_the_default(fmnist, one_thread):
    """Ten FashionMNIST batches through ``step`` (width 256, three replicas, float32 as in training):
    kappa = 1 in parallel (the old default) is flagged on every step with a residual above 1; the defaults of
    both modes are never flagged and converge. The status is per replica, reset by each read."""
    net = build("mlp", fmnist.input_shape, 10, 256, preset("mup", "sgd"), K=3, seeds=[0, 1, 2])
    cases = {"too-large": PC(T=5, inference="parallel", kappa=1.0), "parallel": PC(T=5, inference="parallel"),
             "sequential": PC(T=5)}
    for i in range(10):
        x, y = fmnist.x_train[128 * i:128 * (i + 1)], fmnist.y_train[128 * i:128 * (i + 1)]
        for algo in cases.values():
            algo.step(net, x, y)
    st = {k: a.inference_status() for k, a in cases.items()}
    assert st["too-large"]["energy_rose"] == [1.0] * 3 and min(st["too-large"]["residual"]) > 1, st
    for k in ("parallel", "sequential"):
        assert st[k]["energy_rose"] == [0.0] * 3 and max(st[k]["residual"]) < 0.6, (k, st[k])
        assert st[k]["steps"] == 10 and "backtracks" not in st[k]
    assert max(st["sequential"]["residual"]) < 1e-2  # sequential converges faster than parallel
    assert cases["parallel"].inference_status() == {}  # read and reset
    single = PC()
    single.step(net, fmnist.x_train[:128], fmnist.y_train[:128])
    assert set(single.inference_status()) == {"energy_rose", "steps"}  # T = 1: no residual kept
    off = PC(T=5, inference="parallel", kappa=1.0, no_status=True)
    off.step(net, fmnist.x_train[:128], fmnist.y_train[:128])
    assert off.inference_status() == {}


def test_status_reaches_the_epoch_rows(synth):
    """Trainer: each replica's epoch row carries pc_energy_rose and pc_residual of that epoch: with kappa = 1 in
    parallel (the old, overshooting step) the energy rose in every step and the residual grew; with the default
    it never rose and the residual fell."""
    for kappa, rose in (([1.0, 1.0], 1.0), (None, 0.0)):
        net = build("mlp", synth.input_shape, 10, 32, preset("mup", "sgd", base_width=16), K=2, seeds=[0, 1])
        res = Trainer(net, PC(T=3, inference="parallel", kappa=kappa), synth,
                      TrainConfig(epochs=2, lr=0.05, batch_size=64, max_steps=4, progress=False)).run()
        for rep in res["replicas"]:
            rows = [h for h in rep["history"] if "event" not in h]
            assert len(rows) == 2
            for row in rows:
                assert row["pc_energy_rose"] == rose and (row["pc_residual"] > 1) == bool(rose), row


# ----------------------------------------------------------------------------- (d) the default step by hand
def _small(act="tanh", gbar=0.0, arch="mlp", dtype=torch.float64):
    p = preset("mup", "sgd", gamma_bar_L=gbar, base_width=4).with_(a=(0.0, 0.25, 0.5))
    shape = (1, 8, 8) if arch == "cnn" else (7,)
    net = build(arch, shape, 5, 5 if arch == "cnn" else 12, p, depth=3 if arch == "cnn" else 4, activation=act,
                K=2, seeds=[3, 4], dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, *shape, generator=gen, dtype=dtype)
    return net, x, torch.randint(0, 5, (6,), generator=gen)


@pytest.mark.parametrize("loss,gammas,gbar", [("ce", None, 0.0), ("mse", (1.0, 2.5, 0.5), -1.0),
                                              ("ce", (0.5, 1.0, 2.0), 1.0)])
def test_parallel_default_step_is_the_documented_curvature_bound_by_hand(loss, gammas, gbar):
    """kappa_l = 1/(gamma_l + gamma_{l+1} c_{l+1} ||mult_{l+1} W_{l+1}||_2^2), c = 1 below a hidden layer,
    1 (MSE) or 1/2 (cross-entropy) below the output, computed in numpy from the raw weights; and one
    single-shot parallel step from F-ini moves v_{L-1} by kappa_{L-1} gamma_L phi'(u) * (W_L^T e_L), by hand."""
    net, x, y = _small(gbar=gbar)
    algo = PC(loss=loss, T=1, inference="parallel", gammas=gammas, record=True)
    algo.step(net, x, y)
    m = net.width / net.param.base_width
    gam = (list(gammas) if gammas else [1.0, 1.0, 1.0]) + [m ** -gbar]
    c = [1.0, 1.0, {"ce": 0.5, "mse": 1.0}[loss]]
    for k in range(net.K):
        Ws = [layer.mult * layer.weight[k].numpy() for layer in net.layers]
        bs = [layer.bias[k].numpy() for layer in net.layers]
        for l in range(1, 4):
            s2 = np.linalg.svd(Ws[l], compute_uv=False)[0] ** 2
            expect = 1.0 / (gam[l - 1] + gam[l] * c[l - 1] * s2)
            assert abs(float(algo.stats["kappa"][l - 1][k]) - expect) <= 1e-12 * expect, (l, k)
        # the single step by hand: only v_3 moves (every hidden error is 0 at F-ini)
        u1 = x[k].numpy() @ Ws[0].T + bs[0]
        u2 = np.tanh(u1) @ Ws[1].T + bs[1]
        u3 = np.tanh(u2) @ Ws[2].T + bs[2]
        f = np.tanh(u3) @ Ws[3].T + bs[3]
        Y = np.eye(5)[y.numpy()]
        if loss == "ce":
            p = np.exp(f - f.max(1, keepdims=True))
            e4 = Y - p / p.sum(1, keepdims=True)
        else:
            e4 = Y - f
        k3 = 1.0 / (gam[2] + gam[3] * c[2] * np.linalg.svd(Ws[3], compute_uv=False)[0] ** 2)
        v3 = u3 + k3 * gam[3] * (1 - np.tanh(u3) ** 2) * (e4 @ Ws[3])
        v_code = algo._last[0]
        assert np.allclose(v_code[3][k].numpy(), v3, rtol=1e-12, atol=1e-13)
        assert np.allclose(v_code[2][k].numpy(), u2, rtol=1e-12, atol=1e-13)
        assert np.allclose(v_code[1][k].numpy(), u1, rtol=1e-12, atol=1e-13)


def test_default_steps_of_the_other_modes_are_one_over_gamma():
    """Sequential inference, and parallel under FPA or with parallel_step="gamma", keep kappa_l = 1/gamma_l; an
    explicit kappa overrides the bound."""
    net, x, y = _small()
    for kw in (dict(inference="sequential"), dict(inference="parallel", fpa=True),
               dict(inference="parallel", parallel_step="gamma"), dict(inference="parallel", kappa=0.3)):
        algo = PC(T=2, gammas=(1.0, 2.0, 4.0), record=True, **kw)
        algo.step(net, x, y)
        assert "kappa" not in algo.stats, kw
        assert algo.step_sizes(net) == ([0.3] * 3 if "kappa" in kw else [1.0, 0.5, 0.25])


def test_cnn_default_step_uses_the_conv_operator_norm():
    """CNN: the norm is that of the conv operator on the pooled maps (its matrix read off the layer map and
    decomposed exactly here). The power-iteration estimate approaches ||W||^2 from below (so kappa from above),
    and after n iterations it is within about 1/(2 e n) relative whatever the spectrum: 2e-3 after the cold
    start's 100 (the first replica's two top singular values are within 0.3%, where convergence is slowest)."""
    net, x, y = _small(arch="cnn")
    algo = PC(T=1, inference="parallel", record=True)
    algo.step(net, x, y)
    a = net.post(1, net.layers[0].forward(x))  # (K, B, 5, 4, 4): what the second conv reads
    n = a[0, 0].numel()
    basis = torch.eye(n, dtype=torch.float64).reshape(1, n, *a.shape[2:]).expand(2, n, *a.shape[2:]).contiguous()
    mat = net.layers[1].forward(basis, bias=False).reshape(2, n, -1)
    s2 = torch.linalg.matrix_norm(mat, ord=2) ** 2
    got = 1.0 / algo.stats["kappa"][0] - 1.0  # the estimate of ||W||^2 the step was made with (gammas 1)
    assert bool((got <= s2 * (1 + 1e-12)).all()) and bool((got >= s2 * (1 - 2e-3)).all()), (got, s2)


def test_norm_estimate_tracks_the_weights_during_training(fmnist, one_thread):
    """Warm-started power iteration (one iteration per step) follows ||W||_2 as the weights train: after 60
    SGD steps at width 256 the step is within 1e-2 of the one from the exact norm."""
    net = build("mlp", fmnist.input_shape, 10, 256, preset("mup", "sgd"), seeds=[0])
    from mulocal.optim import LayerwiseOptimizer
    opt = LayerwiseOptimizer.for_net(net, [0.3], "sgd")
    algo = PC(T=2, inference="parallel", record=True)
    for i in range(60):
        grads, _ = algo.step(net, fmnist.x_train[128 * i:128 * (i + 1)], fmnist.y_train[128 * i:128 * (i + 1)])
        opt.step(grads)
    algo.step(net, fmnist.x_train[:128], fmnist.y_train[:128])
    for l, c in ((1, 1.0), (2, 0.5)):
        s2 = torch.linalg.matrix_norm(net.layers[l].mult * net.layers[l].weight[0].double(), ord=2) ** 2
        expect = 1.0 / (1.0 + c * s2)
        assert abs(float(algo.stats["kappa"][l - 1][0]) / float(expect) - 1) < 1e-2


def test_a_resumed_bound_step_continues_its_power_iteration(tmp_path):
    """Parallel PC's bound step warm-starts its ||W||_2 power iteration from the last step: a run resumed from
    its checkpoint continues it (the vectors are checkpointed) and trains bitwise what one run trains."""
    from mulocal.config import assemble
    cell = dict(algo="pc", dataset="synthetic", width=16, batch_size=32, train_subset=160, test_subset=32,
                algo_options={"inference": "parallel", "T": 3})
    whole = assemble(dict(cell, epochs=2), [0.1, 0.2], [0, 1]).trainer().run()
    ck = str(tmp_path / "ck.pt")
    assemble(dict(cell, epochs=1), [0.1, 0.2], [0, 1], checkpoint_path=ck).trainer().run()
    resumed = assemble(dict(cell, epochs=2), [0.1, 0.2], [0, 1], checkpoint_path=ck, resume=True).trainer().run()

    def numbers(res):
        return [[{k: v for k, v in h.items() if k != "epoch_time"} for h in r["history"]] for r in res["replicas"]]
    assert numbers(resumed) == numbers(whole)
