"""The compiled training step (TrainConfig.compile): what it needs from the rules and the optimizer, and that it
trains the same numbers as the eager step.

Oracle: the eager step, which every other test file checks against closed forms, autograd and numpy. The compiled
step must give the same recorded numbers up to float rounding (float64 here: 1e-9 relative), record divergence at
the same step, keep "replica k equals a separate run", be traced once per batch shape (never once per step), and
fall back to the eager step, saying why, where a rule draws on the host. The fast tests compile with the
``aot_eager`` backend (dynamo traces the whole step, AOT autograd functionalises it; no C++ compiler run); the slow
ones with the real default backend (inductor's fused kernels).
"""
from __future__ import annotations

import math

import pytest
import torch

import mulocal.train_compile as TC  # the Trainer's compiled step looks its helpers up here
from mulocal.config import assemble
from mulocal.optim import LayerwiseOptimizer
from mulocal.streams import counter_bits, counter_keys, counter_normal
from mulocal.sweep import run_sweep
from mulocal.sweep.store import Store

THREE = [("bp", {}), ("pc", {"inference": "parallel"}), ("dtp", {"noise_rng": "counter"})]  # one rule each
RTOL = 1e-9  # float64: the compiled graph reorders a few sums


@pytest.fixture
def aot_eager(monkeypatch):
    """Compile with the aot_eager backend (the same tracing, no code generation), and count compiles."""
    calls = []

    def compile_step(fn, mode):
        calls.append(mode)
        return torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")
    monkeypatch.setattr(TC, "compile_step", compile_step)
    return calls


def _train(algo="bp", opts=None, optimizer="sgd", compile="off", lrs=(0.1, 0.05), seeds=(0, 1), arch="mlp",
           epochs=2, n=300, batch=32, depth=3, **cell):
    base = dict(algo=algo, dataset="synthetic", width=32, depth=depth, epochs=epochs, batch_size=batch,
                train_subset=n, test_subset=100, algo_options=opts or {}, optimizer=optimizer, dtype="float64",
                arch=arch)
    run = assemble({**base, **cell}, list(lrs), list(seeds), compile=compile)
    trainer = run.trainer()
    return trainer, trainer.run()


def _numbers(res) -> list:
    """Every recorded number of every replica and epoch (losses, accuracies, inference status)."""
    out = []
    for r in res["replicas"]:
        for h in r["history"]:
            out.append((h.get("event"), h.get("status"), h.get("step")))
            out += [h[k] for k in sorted(h) if k.startswith(("train_", "test_", "pc_")) and h[k] is not None]
    return out


def _assert_close(a, b, rtol=RTOL):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple) or x is None or math.isinf(x):
            assert x == y
        elif math.isnan(x):
            assert math.isnan(y)
        else:
            assert abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12), (x, y)


CONFIGS = [
    ("bp", {}, "sgd", "mlp"),
    ("bp", {}, "adam", "mlp"),
    ("pc", {}, "sgd", "mlp"),  # sequential inference (the default)
    ("pc", {"inference": "parallel"}, "sgd", "mlp"),  # the fused parallel step
    ("pc", {"inference": "parallel", "fpa": True}, "sgd", "mlp"),
    ("dtp", {"noise_rng": "counter"}, "sgd", "mlp"),
    ("dtp", {"noise_rng": "counter", "fb_optimizer": "adam"}, "adam", "mlp"),
    ("tp", {"feedback": "ridge"}, "sgd", "mlp"),
    ("gnt", {}, "sgd", "mlp"),
    ("bp", {}, "sgd", "resmlp"),
    ("dtp", {"noise_rng": "counter"}, "sgd", "resmlp"),
]


@pytest.mark.parametrize("algo,opts,optimizer,arch", CONFIGS)
def test_compiled_training_equals_eager(aot_eager, algo, opts, optimizer, arch):
    lrs = (0.1, 0.05) if optimizer == "sgd" else (1e-3, 3e-3)
    g0 = TC._compile_counts()[0]
    _, eager = _train(algo, opts, optimizer, "off", lrs, arch=arch)
    assert TC._compile_counts()[0] == g0 and not aot_eager and eager["compile"]["used"] is False
    tr, comp = _train(algo, opts, optimizer, "default", lrs, arch=arch)
    assert aot_eager == ["default"]
    info = comp["compile"]
    assert info["used"] and info["fallback"] is None
    # 300 samples in batches of 32: 9 full batches and one of 12, over 2 epochs = one graph per batch shape
    assert info["graphs"] == 2, info
    _assert_close(_numbers(comp), _numbers(eager))
    if algo == "pc":  # the inference status, accumulated on the device, is recorded (and compared above)
        assert "energy_rose" in comp["replicas"][0]["inference"]
    assert tr.opt.state_dict()["t"] == 20  # the step count advanced on the device


def test_reduce_overhead_mode_runs_on_the_cpu_too(aot_eager):
    """The CUDA-graph mode marks each step's start (its previous outputs are dead); on the CPU there is no CUDA
    graph, and the numbers are the eager ones. PC with the spectral step bound keeps its power-iteration vector
    in place across compiled steps."""
    opts = {"inference": "parallel", "parallel_step": "bound"}
    _, eager = _train("pc", opts)
    _, comp = _train("pc", opts, compile="reduce-overhead")
    assert aot_eager == ["reduce-overhead"] and comp["compile"]["used"] and comp["compile"]["graphs"] == 2
    _assert_close(_numbers(comp), _numbers(eager))


def test_compiled_step_keeps_replicas_separate(aot_eager):
    """Replica k of a compiled batched run equals a compiled separate run of it."""
    _, both = _train("dtp", {"noise_rng": "counter"}, compile="default", lrs=(0.1, 0.05), seeds=(3, 8))
    _, one = _train("dtp", {"noise_rng": "counter"}, compile="default", lrs=(0.05,), seeds=(8,))
    alone = {"replicas": [both["replicas"][1]]}
    _assert_close(_numbers(alone), _numbers(one))


def test_compiled_divergence_is_recorded_at_the_same_step(aot_eager):
    """A replica that diverges is recorded with the same step under compile, zeroed and frozen; the other replica
    trains on with the same numbers (the bookkeeping runs on the device inside the compiled step)."""
    kw = dict(lrs=(0.1, 1e4), epochs=2, n=600)
    _, eager = _train(compile="off", **kw)
    tr, comp = _train(compile="default", **kw)
    ev = [h for h in comp["replicas"][1]["history"] if h.get("event") == "diverged"]
    ev0 = [h for h in eager["replicas"][1]["history"] if h.get("event") == "diverged"]
    assert ev and ev == ev0
    assert comp["replicas"][1]["status"] == "diverged"
    assert all((p[1] == 0).all() for p in tr.net.params())
    _assert_close(_numbers(comp), _numbers(eager))


def test_compile_falls_back_to_eager_with_the_reason(aot_eager, capsys):
    """DTP drawing its noise on host generators (its default on a CPU) cannot be one graph: the run says why, once,
    and trains the same numbers as eager (bitwise: no compiled step ran)."""
    _, eager = _train("dtp", {})
    _, comp = _train("dtp", {}, compile="default")
    assert comp["compile"]["used"] is False
    assert "noise_rng='auto' draws the feedback noise on host generators" in comp["compile"]["fallback"]
    assert capsys.readouterr().err.count("runs eagerly") == 1
    assert _numbers(comp) == _numbers(eager)
    _, pc = _train("pc", {"tol": 1e-6}, compile="default")
    assert "tol" in pc["compile"]["fallback"]


def test_compile_falls_back_when_tracing_fails(aot_eager, monkeypatch):
    """A step that dynamo cannot trace (here: a host read planted in the rule) runs eagerly; nothing ran twice."""
    from mulocal.algos.bp import BP
    step = BP.step

    def with_host_read(self, net, x, y, opt=None):
        grads, loss = step(self, net, x, y, opt)
        if float(loss.sum()) != float(loss.sum()):  # a host read dynamo does not trace in fullgraph mode
            loss = loss + 0
        return grads, loss
    _, eager = _train()
    monkeypatch.setattr(BP, "step", with_host_read)
    _, comp = _train(compile="default")
    assert comp["compile"]["used"] is False and comp["compile"]["fallback"]
    assert _numbers(comp) == _numbers(eager)


def test_compiled_run_resumes_from_its_checkpoint(aot_eager, tmp_path):
    """Adam under compile: one epoch, a checkpoint, a resumed second epoch = two epochs in one go (the step count
    t is checkpointed from the device)."""
    ck = tmp_path / "ck.pt"
    kw = dict(optimizer="adam", lrs=(1e-3, 3e-3), compile="default")
    _, full = _train(epochs=2, **kw)
    run = assemble(dict(algo="bp", dataset="synthetic", width=32, epochs=1, batch_size=32, train_subset=300,
                        test_subset=100, optimizer="adam", dtype="float64"), [1e-3, 3e-3], [0, 1],
                   compile="default", checkpoint_path=str(ck))
    run.trainer().run()
    assert torch.load(ck, weights_only=False)["opt"]["t"] == 10
    run2 = assemble(dict(algo="bp", dataset="synthetic", width=32, epochs=2, batch_size=32, train_subset=300,
                         test_subset=100, optimizer="adam", dtype="float64"), [1e-3, 3e-3], [0, 1],
                    compile="default", checkpoint_path=str(ck), resume=True)
    resumed = run2.trainer().run()
    _assert_close(_numbers(resumed), _numbers(full))


def test_sweep_passes_compile_to_its_tasks(aot_eager, tmp_path):
    spec = dict(algo="bp", dataset="synthetic", widths=[16], lrs=[0.1, 0.05], seeds=[0], epochs=1, batch_size=32,
                train_subset=200, test_subset=100, dtype="float64")
    for mode in ("off", "default"):
        s = run_sweep(spec, tmp_path / f"{mode}.sqlite", workers=0, compile=mode, progress=False)
        assert s["failed"] == 0
    assert aot_eager == ["default"]
    rows = {}
    for mode in ("off", "default"):
        with Store(tmp_path / f"{mode}.sqlite", create=False, readonly=True) as st:
            rows[mode] = sorted((r["lr"], r["test_loss"]) for r in st.rows())
    _assert_close([v for r in rows["default"] for v in r], [v for r in rows["off"] for v in r])
    with pytest.raises(Exception, match="compile mode"):
        run_sweep(spec, tmp_path / "bad.sqlite", workers=0, compile="fast", progress=False)


def test_each_trainer_compiles_its_own_step(aot_eager):
    """Dynamo caches graphs per code object: a process that runs many trainers (a sweep's tasks run inline), or
    interleaves two, must not share one cache (the 9th would hit the recompile limit and silently run eagerly)."""
    import torch._dynamo
    limit = torch._dynamo.config.recompile_limit
    runs = [assemble(dict(algo="bp", dataset="synthetic", width=8 + i, epochs=1, batch_size=32, train_subset=64,
                          test_subset=32, dtype="float64"), [0.1], [i], compile="default").trainer()
            for i in range(limit + 2)]
    for tr in runs:
        res = tr.run()
        assert res["compile"]["used"] and res["compile"]["graphs"] == 1, res["compile"]
    # two trainers alternating epochs keep their graphs (no retrace), and each trains its own numbers
    a, b = runs[0], runs[1]
    g0 = TC._compile_counts()[0]
    for tr in (a, b, a, b):
        tr.cfg.epochs += 1
        tr.run()
    assert TC._compile_counts()[0] == g0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["reduce-overhead", "cuda-graph"])
@pytest.mark.parametrize("algo,opts", THREE)
def test_cuda_graphs_train_like_eager(algo, opts, mode):
    """On a GPU, compile="reduce-overhead" (torch.compile's CUDA graphs, none skipped) and compile="cuda-graph" (the
    eager step captured; tests/test_capture.py) replay each batch shape's step as one graph and train the same
    numbers as the eager step up to float32 rounding (3 epochs: cuda-graph captures the last, smaller batch in the
    third)."""
    runs = {}
    for m in ("off", mode):
        run = assemble(dict(algo=algo, dataset="synthetic", width=64, depth=3, epochs=3, batch_size=32,
                            train_subset=600, test_subset=100, algo_options=opts, dtype="float32"), [0.1, 0.05],
                       [0, 1], compile=m, device="cuda")
        runs[m] = run.trainer().run()
    info = runs[mode]["compile"]
    assert info["used"] and info["graphs"] == 2 and info["fallback"] is None, info
    assert info.get("cudagraph_skips", 0) == 0, info
    _assert_close(_numbers(runs[mode]), _numbers(runs["off"]), rtol=1e-4)


# ---------------------------------------------------------------------------- what the compiled step needs
def test_graph_safe_optimizer_matches_eager():
    """SGD (momentum) graph-safe = eager bitwise; Adam with bias corrections from a device step count = eager up to
    the rounding of beta^t; switching back hands the count to ``t``."""
    g = torch.Generator().manual_seed(0)
    for kind, kw, exact in (("sgd", {"momentum": 0.9}, True), ("adam", {}, False)):
        p0 = [torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g,
                                                                                   dtype=torch.float64)]
        grads = [[torch.randn_like(p) for p in p0] for _ in range(12)]
        out = []
        for safe in (False, True):
            ps = [p.clone() for p in p0]
            opt = LayerwiseOptimizer(ps, [1.0, 0.5], [0.1, 0.01], kind, **kw)
            opt.set_graph_safe(safe)
            for gs in grads:
                opt.step(gs)
            assert opt.state_dict()["t"] == 12
            opt.set_graph_safe(False)
            assert opt.t == 12
            out.append(ps)
        for a, b in zip(*out):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-13, atol=0)


def test_freeze_updates_the_learning_rates_in_place():
    """A captured step reads the same learning-rate tensors: freezing a replica writes into them."""
    ps = [torch.zeros(3, 2, 2)]
    opt = LayerwiseOptimizer(ps, [1.0], [0.1, 0.2, 0.3])
    before = opt.lrs[0]
    opt.freeze(torch.tensor([False, True, False]))
    assert opt.lrs[0] is before
    assert before.flatten().tolist() == pytest.approx([0.1, 0.0, 0.3])


def test_counter_normal_takes_a_device_counter():
    """The counter as a 0-dim int64 tensor gives the same bits and normals as the int (mixed on the device)."""
    keys = counter_keys("feedback_noise_counter", [4, 7, 9])
    for c in (0, 1, 5, 2 ** 40 + 3):
        t = torch.tensor(c, dtype=torch.int64)
        assert torch.equal(counter_bits(keys, t, 7), counter_bits(keys, c, 7))
        assert torch.equal(counter_normal(keys, t, (3, 5), torch.float64), counter_normal(keys, c, (3, 5),
                                                                                           torch.float64))
        assert int(t) == c  # not advanced by drawing
    with pytest.raises(ValueError, match="0-dim int64"):
        counter_bits(keys, torch.tensor([1]), 3)
    with pytest.raises(ValueError, match="0-dim int64"):
        counter_bits(keys, torch.tensor(1.0), 3)


def test_tp_noise_counter_lives_on_the_device(synth):
    from mulocal.algos import make_algo
    from mulocal.nets import MLP
    from mulocal.param import preset
    net = MLP(32, 16, 10, depth=3, param=preset("mup"), K=2, activation="tanh", bias=True, dtype=torch.float64,
              device="cpu").init([0, 1])
    algo = make_algo("dtp", noise_rng="counter")
    x, y = synth.x_train[:8].expand(2, 8, 32), synth.y_train[:8].expand(2, 8)
    algo.step(net, x, y)
    assert isinstance(algo._counter, torch.Tensor) and algo._counter.dim() == 0
    n = algo.noise_counter
    assert n == 2  # one draw per hidden target space (L - 1 = 2) and feedback iteration (1)
    state = algo.state_dict()
    assert state["noise_counter"] == n
    algo.noise_counter = 7
    assert int(algo._counter) == 7


# ---------------------------------------------------------------------------- the real backend (slow)
@pytest.mark.slow
@pytest.mark.parametrize("algo,opts", THREE)
def test_inductor_compiled_training_equals_eager(algo, opts):
    _, eager = _train(algo, opts, epochs=1)
    _, comp = _train(algo, opts, compile="default", epochs=1)
    assert comp["compile"]["used"] and comp["compile"]["graphs"] == 2
    _assert_close(_numbers(comp), _numbers(eager), rtol=1e-8)
