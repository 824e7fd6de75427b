"""compile="cuda-graph": the eager training step recorded once per batch shape and replayed
(``train_compile.capture_step``).

A CUDA graph replays the kernels it recorded on the same memory, with every Python number frozen at its recorded
value, and recording runs nothing. On the CPU, ``FakeGraph`` below keeps that contract operation by operation: it
records the aten operations of one step (on clones of every tensor from outside the step, so that recording changes
nothing), then replays them on the original tensors with their recorded arguments. A step whose numbers depend on
Python state that changes between steps (a step count kept as an int, a scale computed on the host) therefore
trains other numbers when replayed, here as on a GPU; a host read or an operation whose output size depends on
the data (a device sync) inside the step cannot be recorded (a GPU refuses them as well); and the graph does not
keep the outside tensors alive (a GPU graph holds their addresses only): replaying after one was freed (memory
the allocator may have handed to another tensor) is an error.

Oracle: the eager step (checked by the other test files). Replayed steps run the same operations in the same order
as the eager ones: the same numbers bitwise for SGD (Adam in graph-safe mode takes its bias corrections from a
device step count: equal up to the rounding of beta^t). The real capture is tested on a GPU (test_compile.py's
CUDA-only test, skipped elsewhere).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
import weakref

import mulocal.train_compile as TC  # the Trainer's compiled step looks its helpers up here
from test_compile import CONFIGS, _assert_close, _numbers, _train


SYNCS = {torch.ops.aten._local_scalar_dense.default: "a host read", torch.ops.aten.nonzero.default: "nonzero",
         torch.ops.aten.masked_select.default: "masked_select", torch.ops.aten.lift_fresh.default: "host data",
         torch.ops.aten.lift_fresh_copy.default: "host data"}


class FakeGraph(TorchDispatchMode):
    """Records the aten operations of a function, without changing any tensor from outside it, and replays them."""

    def __init__(self):
        super().__init__()
        self.ops, self.made, self.original, self.clones, self.keep = [], set(), {}, {}, []
        self.outside = []  # strong references while recording only (ids stay unique); weak ones afterwards
        self.result = None

    def _recording(self, t):
        """What an operation sees while recording: a tensor made while recording, or a clone of an outside one."""
        if not isinstance(t, torch.Tensor) or id(t) in self.made:
            return t
        c = self.clones.get(id(t))
        if c is None:
            c = self.clones[id(t)] = t.clone()
            self.original[id(c)] = weakref.ref(t)
            self.made.add(id(c))
            self.keep.append(c)
            self.outside.append(t)
        return c

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({SYNCS[func]})")
        if func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            raise RuntimeError("operation not permitted when stream is capturing (nonzero of a boolean mask)")
        args, kwargs = tree_map(self._recording, (args, kwargs or {}))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self.made:
                self.made.add(id(t))
                self.keep.append(t)
        self.ops.append((func, args, kwargs, out))
        return out

    def replay(self):
        env = {}

        def now(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in self.original:  # a clone stands for the outside tensor's memory
                orig = self.original[id(t)]()
                assert orig is not None, "a captured step reads a tensor that was freed after its capture"
                return orig
            return env[id(t)]
        for func, args, kwargs, out in self.ops:
            a, k = tree_map(now, (args, kwargs))
            new = func(*a, **k)
            for old, fresh in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                if isinstance(old, torch.Tensor) and id(old) not in self.original:
                    env[id(old)] = fresh
        # the result: what the step returned (an in-place method returns its outside tensor itself, not a clone)
        return tree_map(lambda t: now(t) if isinstance(t, torch.Tensor) and id(t) in env.keys() | self.original.keys()
                        else t, self.result)


def fake_capture(fn, args):
    graph = FakeGraph()
    try:
        with graph:
            graph.result = fn(*args)
    except RuntimeError as err:
        raise TC.CaptureError(str(err)) from None
    graph.outside = []
    return graph.replay


@pytest.fixture
def fake_graphs(monkeypatch):
    """compile="cuda-graph" on the CPU: captures through FakeGraph (counted)."""
    calls = []

    def capture(fn, args):
        calls.append(tuple(args[2].shape))
        return fake_capture(fn, args)
    monkeypatch.setattr(TC, "capture_step", capture)
    return calls


# ------------------------------------------------------------------------------------ the fake keeps the contract
def test_the_fake_graph_freezes_python_numbers_and_records_without_running():
    """The stand-in behaves as a CUDA graph: recording changes no outside tensor, a replay updates them in place,
    a Python number read while recording stays frozen, and a host read cannot be recorded."""
    w, state = torch.zeros(3, dtype=torch.float64), {"t": 0}

    def step(x):
        state["t"] += 1
        w.add_(x * state["t"])  # a Python count read as a number: frozen at its recorded value (1)
        return w.sum()
    x = torch.ones(3, dtype=torch.float64)
    replay = fake_capture(step, (x,))
    assert torch.equal(w, torch.zeros(3, dtype=torch.float64))  # recording ran nothing
    out = [float(replay()) for _ in range(3)]
    assert out == [3.0, 6.0, 9.0] and state["t"] == 1  # eager would give 3, 9, 18 (t = 2, 3, 4)
    x.fill_(2.0)  # inputs are read in place at each replay
    assert float(replay()) == 15.0
    with pytest.raises(TC.CaptureError, match="host read"):
        fake_capture(lambda v: v * float(v.sum()), (x,))
    with pytest.raises(TC.CaptureError, match="nonzero"):
        fake_capture(lambda v: v[v > 1], (x,))  # an output size that depends on the data: a device sync
    buf = {"b": torch.ones(3, dtype=torch.float64)}
    replay = fake_capture(lambda v: buf["b"].mul_(v).sum(), (x,))
    buf["b"] = torch.ones(3, dtype=torch.float64)  # the recorded buffer is dropped (freed on a GPU) ...
    with pytest.raises(AssertionError, match="freed"):  # ... and the graph would write into recycled memory
        replay()


# ------------------------------------------------------------------------------------ captured training
MORE = [  # replays are cheap to check: more of each rule's paths than the compile tests take
    ("dtp", {"noise_rng": "counter", "fb_loss": "ldrl", "fb_iters": 2}, "sgd", "mlp"),  # two draws a layer
    ("dtp", {"noise_rng": "counter", "feedback": "linear"}, "sgd", "resmlp"),
    ("tp", {"noise_rng": "counter"}, "sgd", "mlp"),
    ("pc", {"inference": "parallel", "parallel_step": "bound"}, "sgd", "mlp"),  # warm power iteration
    ("pc", {"T": 3}, "adam", "resmlp"),  # the error solver (auto on a residual net) with its guard
    ("pc", {"inference": "error", "guard": False}, "sgd", "resmlp"),
    ("pc", {"inference": "mupc"}, "sgd", "resmlp"),
]


@pytest.mark.parametrize("algo,opts,optimizer,arch", CONFIGS + MORE)
def test_captured_training_equals_eager(fake_graphs, algo, opts, optimizer, arch):
    """Three epochs (300 samples in batches of 32: 9 full batches and one of 12 each), eager and captured: each batch
    shape captured once after its warm-up steps, and the recorded numbers the eager ones (bitwise with SGD)."""
    lrs = (0.1, 0.05) if optimizer == "sgd" else (1e-3, 3e-3)
    _, eager = _train(algo, opts, optimizer, "off", lrs, arch=arch, epochs=3)
    tr, cap = _train(algo, opts, optimizer, "cuda-graph", lrs, arch=arch, epochs=3)
    info = cap["compile"]
    assert info["used"] and info["fallback"] is None and info["graphs"] == 2, info
    assert fake_graphs == [(2, 32), (2, 12)]  # the full batch at step 1 + warm-up, the last one in epoch 3
    if optimizer == "sgd":
        assert _numbers(cap) == _numbers(eager)
    else:
        _assert_close(_numbers(cap), _numbers(eager), rtol=1e-12)
    assert tr.opt.state_dict()["t"] == 30  # the step count advanced on the device by every replay


def test_captured_steps_keep_replicas_separate_and_divergence_exact(fake_graphs):
    """Replica k of a captured batched run equals a captured separate run; a replica that diverges is recorded at
    the same step as eager, zeroed and frozen (its learning rates written in place, read by the replays)."""
    opts = {"noise_rng": "counter"}
    _, both = _train("dtp", opts, compile="cuda-graph", lrs=(0.1, 0.05), seeds=(3, 8))
    _, one = _train("dtp", opts, compile="cuda-graph", lrs=(0.05,), seeds=(8,))
    assert _numbers({"replicas": [both["replicas"][1]]}) == _numbers(one)
    kw = dict(lrs=(0.1, 1e4), epochs=2, n=600)
    _, eager = _train(compile="off", **kw)
    tr, cap = _train(compile="cuda-graph", **kw)
    ev = [h for h in cap["replicas"][1]["history"] if h.get("event") == "diverged"]
    assert ev and ev == [h for h in eager["replicas"][1]["history"] if h.get("event") == "diverged"]
    assert all((p[1] == 0).all() for p in tr.net.params())
    assert _numbers(cap) == _numbers(eager)


def test_captured_run_resumes_from_its_checkpoint(fake_graphs, tmp_path):
    """Adam captured: one epoch, a checkpoint, a resumed second epoch = two epochs in one go."""
    from mulocal.config import assemble
    cell = dict(algo="bp", dataset="synthetic", width=32, batch_size=32, train_subset=300, test_subset=100,
                optimizer="adam", dtype="float64")
    _, full = _train(optimizer="adam", lrs=(1e-3, 3e-3), compile="cuda-graph", epochs=2)
    ck = str(tmp_path / "ck.pt")
    for epochs, resume in ((1, False), (2, True)):
        res = assemble(dict(cell, epochs=epochs), [1e-3, 3e-3], [0, 1], compile="cuda-graph", checkpoint_path=ck,
                       resume=resume).trainer().run()
    assert res["compile"]["used"]
    _assert_close(_numbers(res), _numbers(full), rtol=1e-12)


def test_cuda_graph_falls_back_to_eager_with_the_reason(fake_graphs, capsys):
    """A rule that draws on the host is never captured (the reason said once); a step with a host read cannot be
    recorded and runs eagerly from then on (nothing ran twice)."""
    _, eager = _train("dtp", {"noise_rng": "host"})
    _, cap = _train("dtp", {"noise_rng": "host"}, compile="cuda-graph")
    assert not cap["compile"]["used"] and "noise_rng='host'" in cap["compile"]["fallback"]
    assert capsys.readouterr().err.count("runs eagerly") == 1
    assert _numbers(cap) == _numbers(eager) and fake_graphs == []


def test_a_step_with_a_host_read_is_not_captured(fake_graphs, monkeypatch):
    from mulocal.algos.bp import BP
    step = BP.step

    def with_host_read(self, net, x, y, opt=None):
        grads, loss = step(self, net, x, y, opt)
        if float(loss.sum()) != float(loss.sum()):
            loss = loss + 0
        return grads, loss
    _, eager = _train()
    monkeypatch.setattr(BP, "step", with_host_read)
    _, cap = _train(compile="cuda-graph")
    assert not cap["compile"]["used"] and "host read" in cap["compile"]["fallback"]
    assert _numbers(cap) == _numbers(eager)


def test_cuda_graph_on_the_cpu_runs_eagerly_and_says_so(capsys):
    """Without the stand-in, a CPU run asked for CUDA graphs trains its eager numbers and says why once."""
    _, eager = _train()
    _, cap = _train(compile="cuda-graph")
    assert not cap["compile"]["used"] and "CUDA device" in cap["compile"]["fallback"]
    assert capsys.readouterr().err.count("runs eagerly") == 1
    assert _numbers(cap) == _numbers(eager)
