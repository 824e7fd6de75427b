"""The training step compiled (``TrainConfig.compile``): torch.compile, or captured as a CUDA graph and replayed.

``CompiledStep`` is the part of ``Trainer`` that runs the step: eagerly, or after its first eager step through
:func:`compile_step` ("default", "reduce-overhead"), or, with "cuda-graph", each batch shape's eager step recorded
once (:func:`capture_step`, after ``CAPTURE_WARMUP`` eager steps on a side stream) and replayed; a step that cannot
be compiled or captured runs eagerly and says why. Also :func:`fp32_precision`, the GPU's float32 mode during a run.
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import torch

from .errors import check_choice
from .util import COMPILE_MODES

CAPTURE_WARMUP = 2  # compile="cuda-graph": eager steps of a batch shape (graph-safe, side stream) before its capture


def check_compile(mode: str) -> str:
    """``mode`` if it is one of COMPILE_MODES, else a ConfigError naming them."""
    return check_choice("compile mode", mode, COMPILE_MODES)


@contextmanager
def fp32_precision(precision: str):
    """Within the block, float32 matrix products (cuBLAS) and convolutions (cuDNN) on a GPU use ``precision``:
    "ieee" (strict float32) or "tf32" (TensorFloat-32); the previous settings come back after it."""
    knobs = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    before = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = precision
        yield
    finally:
        for k, b in zip(knobs, before):
            k.fp32_precision = b


def compile_step(fn, mode: str):
    """``fn`` through torch.compile: one whole graph (``fullgraph``: a graph break is an error, never a silent
    partial compile), static shapes, ``mode`` "default" (inductor's fused kernels) or "reduce-overhead" (and
    CUDA graphs on a GPU)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)


class CaptureError(RuntimeError):
    """A training step could not be captured as a CUDA graph (nothing of it ran)."""


def capture_step(fn, args: tuple):
    """Record ``fn(*args)`` as a CUDA graph and return ``replay()``, which runs the recorded kernels on the tensors
    they were recorded with (every argument and every tensor ``fn`` touches keeps its address; Python numbers are
    frozen at their recorded values) and returns the outputs of the recording (the same tensors at each replay,
    overwritten by it). Capturing runs nothing. A step that cannot be captured (not on a GPU; a host read or
    host copy inside it) raises :class:`CaptureError`."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or tensors[0].device.type != "cuda":
        raise CaptureError("a CUDA graph needs a CUDA device")
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn(*args)
    except RuntimeError as err:  # e.g. "operation not permitted when stream is capturing"
        raise CaptureError(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__) from None

    def replay():
        graph.replay()
        return out
    return replay


@contextmanager
def _side_stream(device: torch.device):
    """On a GPU, the block runs on a side stream that waits for the current one (and is waited for after it): the
    warm-up steps before a CUDA-graph capture (as torch.cuda.graphs' documentation does). Elsewhere: nothing."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


def _own_code(method):
    """``method`` bound to its object, with a copy of its code object: dynamo keeps its compiled graphs and counts
    recompiles per code object, so each Trainer gets its own cache (with one shared code object the 9th Trainer
    of a process, e.g. a sweep running its tasks inline, would hit dynamo's recompile limit and run eagerly)."""
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, method.__self__)


def _graphs_of(code, fallback: int) -> int:
    """The graphs dynamo holds for ``code`` (this Trainer's own step: one per batch shape), or ``fallback``."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        return len(_debug_get_cache_entry_list(code))
    except (ImportError, AttributeError, TypeError):
        return fallback


def _compile_counts() -> tuple[int, int]:
    """(graphs compiled by torch.compile in this process so far, graphs inductor ran without a CUDA graph). A step
    compiled once per batch shape adds one or two graphs; a count that grows with the steps means recompiles."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])


def _tensors_of(obj, depth: int = 4) -> list[torch.Tensor]:
    """The tensors held by ``obj`` (lists, tuples, dicts, objects' attributes), ``depth`` levels down."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0 or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.Generator)):
        return []
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return []
    return [t for v in items for t in _tensors_of(v, depth - 1)]


def _mark_static(t: torch.Tensor) -> None:
    """Tell torch.compile that ``t`` keeps its address (a CUDA graph then reads it in place instead of copying
    it in at every replay, and may update it in place)."""
    import torch._dynamo
    torch._dynamo.mark_static_address(t, guard=False)


class CompiledStep:
    """The compiled training step of ``Trainer``: it runs ``_train_step`` (one step of every replica) through
    ``_step``; needs ``cfg``, ``net``, ``algo``, ``opt``, ``_acc`` and ``_limit``."""

    def _init_compiling(self, mode: str) -> None:
        """Nothing compiled yet: the state of the compiled step for a run with compile mode ``mode``."""
        self._compiled = None  # the compiled training step (compile != "off", after the first eager step)
        self._captured: dict = {}  # compile="cuda-graph": batch shape -> replay of its captured step
        self._seen: dict = {}  # compile="cuda-graph": batch shape -> its eager steps so far
        self._idx_bufs: dict = {}
        self._graphs0 = (0, 0)
        self._compiled_code = None
        self.compile_info = {"mode": mode, "used": False, "graphs": 0, "fallback": None}

    def _batch_index(self, idx: torch.Tensor) -> torch.Tensor:
        """The step's sample indices (K, B). Compiled: copied into a buffer of that shape, so that the step reads
        the same memory every time (a captured graph replays on fixed addresses)."""
        if self._compiled is None:
            return idx
        buf = self._idx_bufs.get(tuple(idx.shape))
        if buf is None:
            buf = self._idx_bufs[tuple(idx.shape)] = torch.empty_like(idx)
            _mark_static(buf)
        return buf.copy_(idx)

    def _step(self, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The training step: eager, or compiled after the first eager step when ``compile`` asks for it; a
        step that fails to compile falls back to eager for the rest of the run (said once on stderr and in
        the result's ``compile`` entry)."""
        if self._compiled is None:
            loss = self._train_step(x_all, y_all, idx)
            if self.cfg.compile != "off" and self.compile_info["fallback"] is None:
                blocker = getattr(self.algo, "compile_blocker", lambda net: None)(self.net)
                if blocker:
                    self._stop_compiling(blocker)
                else:
                    self._start_compiling(x_all, y_all)
            return loss
        try:
            if self.cfg.compile == "reduce-overhead":  # a new training step: the last replay's outputs are dead
                torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(x_all, y_all, idx)
        except (torch._dynamo.exc.TorchDynamoException, CaptureError) as err:  # tracing or capturing: nothing ran
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            self._stop_compiling(reason[:300])
            return self._train_step(x_all, y_all, idx)

    def _graph_step(self, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """compile="cuda-graph": replay the batch shape's captured step; before it is captured, ``CAPTURE_WARMUP``
        eager steps of the shape (on a side stream on a GPU, so that lazily made handles and workspaces exist
        before the capture), then capture it (nothing runs while capturing) and replay it once."""
        shape = tuple(idx.shape)
        replay = self._captured.get(shape)
        if replay is None:
            seen = self._seen[shape] = self._seen.get(shape, 0) + 1
            if seen <= CAPTURE_WARMUP:
                with _side_stream(x_all.device):
                    return self._train_step(x_all, y_all, idx)
            replay = self._captured[shape] = capture_step(self._train_step, (x_all, y_all, idx))
        return replay()

    def _start_compiling(self, x_all, y_all) -> None:
        import torch._dynamo  # noqa: F401 (loads torch._dynamo.exc, which _step catches)
        self.opt.set_graph_safe(True)
        if hasattr(self.algo, "set_graph_safe"):
            self.algo.set_graph_safe(True)
        self.compile_info["used"] = True
        if self.cfg.compile == "cuda-graph":  # recorded as it runs: every tensor keeps its address anyway
            self._compiled = self._graph_step
            return
        for t in (x_all, y_all, *_tensors_of((self.net.params(), self.opt, self.algo, self._acc, self._limit))):
            _mark_static(t)
        self._graphs0 = _compile_counts()
        own = _own_code(self._train_step)
        self._compiled_code = own.__func__.__code__
        self._compiled = compile_step(own, self.cfg.compile)

    def _stop_compiling(self, reason: str) -> None:
        self._compiled, self._captured = None, {}
        self.opt.set_graph_safe(False)
        if hasattr(self.algo, "set_graph_safe"):
            self.algo.set_graph_safe(False)
        self.compile_info.update(used=False, fallback=reason)
        print(f"warning: compile={self.cfg.compile}: the training step runs eagerly ({reason})", file=sys.stderr)

    def _count_graphs(self) -> None:
        """Record in ``compile_info`` the graphs compiled or captured so far."""
        if self.compile_info["used"] and self.cfg.compile == "cuda-graph":
            self.compile_info["graphs"] = len(self._captured)  # one per batch shape captured
        elif self.compile_info["used"]:
            now = _compile_counts()
            self.compile_info["graphs"] = _graphs_of(self._compiled_code, now[0] - self._graphs0[0])
            if self.cfg.compile == "reduce-overhead":  # graphs run without a CUDA graph (a GPU; process-wide count)
                self.compile_info["cudagraph_skips"] = now[1] - self._graphs0[1]
