"""Sweeps: cross products of training configurations, run as batched replicas into a resumable store.

A sweep spec maps keys to a value or a list of values; the sweep is the cross product of all
lists. ``widths``, ``lrs`` and ``seeds`` are lists; every other key (``algo``, ``param``,
``optimizer``, ``epochs``, ``batch_size``, ``dataset``, ...: see ``AXES``) may be either.
``algo_options`` (options of the learning rule, optionally scoped per algorithm:
``{"T": [1, 4]}`` or ``{"pc": {"T": [1, 4]}}``) and ``param_options`` (field overrides of the
parameterization preset) are swept the same way; a list value is an axis, so a literal list
option is written as a list of one list (``kappa = [[0.5, 0.5]]``).

A *cell* is one configuration with one ``lr`` and one ``seed``. All cells that share everything
but ``lr`` and ``seed`` form a *group*: they train together as the K replicas of one batched model
(``Trainer``), chunked so that K stays under ``--max-replicas`` and a memory budget. Each
replica has its own seeded initialisation and data order, so a cell's numbers do not depend on
which cells it was batched with, nor on the executor that ran it: with one torch thread per
task (the pool's default when there are as many workers as cores, ``--threads 1`` otherwise)
they are bitwise identical; with several threads, PyTorch's matmuls may split their sums
differently for different replica counts, which changes results at float32 rounding level
(and training at learning rates past the optimum, being chaotic, amplifies it).

Cells live in a :class:`~mulocal.store.Store` (SQLite). A sweep adds the cells of its spec that
the store lacks, runs the ones that are not finished, and writes each finished task in one
transaction; killing it at any moment and starting it again runs only what is missing.

Executors: ``--workers 0`` runs in this process; ``--executor local`` (default) a process pool
(spawned workers, one per core by default, each with ``cores // workers`` torch threads);
``--executor ray`` Ray tasks on a local instance or on ``--ray-address``. Only this process
writes to the store.

Command line (registered by :func:`register_cli`; also ``python -m mulocal.sweep``)::

    mulocal sweep --algo bp --param mup,sp --widths 32,64 --lrs 0.01,0.1 --seeds 0,1 --epochs 1 \\
                  --dataset synthetic --store runs.sqlite
    mulocal sweep --spec sweep.toml            # [sweep] table of keys, optional [run] table
    mulocal report --store runs.sqlite --json  # best LR per width, transfer slope, penalty
    mulocal plot --store runs.sqlite --out plots/

A spec file (flags given on the command line override its values)::

    [sweep]
    algo = ["bp", "pc"]
    param = ["mup", "sp"]
    widths = [64, 128, 256, 512]
    lrs = [0.0625, 0.125, 0.25, 0.5, 1.0]
    seeds = [0, 1]
    dataset = "fashion-mnist"
    train_subset = 10000

    [sweep.algo_options.pc]     # PC only: two values of T, i.e. two PC families
    T = [1, 4]

    [run]                       # optional: store, executor, workers, threads, max_replicas, ...
    store = "runs/transfer.sqlite"
"""
from __future__ import annotations

import argparse
import json
import itertools
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, MulocalError
from .store import Store, config_hash, group_of, owner_token

# ------------------------------------------------------------------------------------------ the spec
# key: (kind, default, help). Every key may hold one value or a list of values.
AXES: dict[str, tuple[str, Any, str]] = {
    "algo": ("str", "bp", "learning rule(s): bp, pc, ..."),
    "param": ("str", "mup", "parameterization preset(s): mup, sp, ..."),
    "optimizer": ("str", "sgd", "sgd or adam"),
    "gamma_bar_L": ("float", 0.0, "PC output energy width exponent (preset argument)"),
    "base_width": ("int", 64, "width at which every preset equals SP"),
    "arch": ("str", "mlp", "mlp or cnn"),
    "depth": ("int", 3, "number of weight layers"),
    "activation": ("str", "tanh", "tanh, relu or linear"),
    "bias": ("bool", True, "layers with biases (true/false)"),
    "loss": ("str", "ce", "ce or mse"),
    "dtype": ("str", "float32", "float32 or float64"),
    "dataset": ("str", "fashion-mnist", "fashion-mnist, mnist, cifar10 or synthetic"),
    "train_subset": ("int?", None, "training samples used (default: all)"),
    "test_subset": ("int?", None, "test samples used (default: all)"),
    "data_seed": ("int0", 0, "seed of the subset selection (and of the synthetic task)"),
    "epochs": ("int", 1, "epochs"),
    "batch_size": ("int", 128, "batch size"),
    "max_steps": ("int?", None, "stop each epoch after this many steps"),
    "momentum": ("float", 0.0, "SGD momentum"),
    "weight_decay": ("float", 0.0, "weight decay"),
}
LISTS = {"widths": "int", "lrs": "lr", "seeds": "int0"}
ALIASES = {"width": "widths", "lr": "lrs", "seed": "seeds", "algorithm": "algo", "parameterization": "param"}
OPTION_KEYS = ("algo_options", "param_options")
RUN_KEYS = ("store", "executor", "workers", "threads", "ray_address", "max_replicas", "memory_budget_mb", "device",
            "data_dir", "eval_batch_size")
DTYPES = ("float32", "float64")
EXECUTORS = ("local", "ray")


def _coerce(key: str, value, kind: str):
    """One value of a spec key, checked and converted to its canonical type."""
    what = f"sweep key '{key}'"
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if kind in ("int", "int?", "int0"):
        if kind == "int?" and (value is None or (isinstance(value, str) and value.lower() in ("none", "all", ""))):
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            v = int(value) if not isinstance(value, float) else (int(value) if value.is_integer() else None)
            if v is None:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be an integer, got {value!r}") from None
        if v < (0 if kind == "int0" else 1):
            raise ConfigError(f"{what} must be {'non-negative' if kind == 'int0' else 'positive'}, got {v}")
        return v
    if kind in ("float", "lr"):
        try:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
        if not math.isfinite(v) or (kind == "lr" and v <= 0):
            raise ConfigError(f"{what} must be {'positive and ' if kind == 'lr' else ''}finite, got {value!r}")
        return v
    raise AssertionError(kind)


def _as_list(value) -> list:
    if isinstance(value, tuple):
        value = list(value)
    return value if isinstance(value, list) else [value]


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"option values must be finite, got {value!r}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"option value {value!r} is not a number, string, boolean or list")


def _known_algos() -> tuple[str, ...]:
    from .algos import ALGOS
    return tuple(ALGOS)


def _norm_options(key: str, value, scoped: bool) -> dict[str, dict[str, list]]:
    """{scope: {option: [values]}}; scope '*' applies to every algorithm."""
    if value is None:
        return {"*": {}}
    if not isinstance(value, dict):
        raise ConfigError(f"sweep key '{key}' must be a table of options, got {value!r}")
    out: dict[str, dict[str, list]] = {"*": {}}
    for k, v in value.items():
        if k == "*" and isinstance(v, dict):  # already normalized
            out["*"].update({str(ok): [_jsonable(x) for x in _as_list(ov)] for ok, ov in v.items()})
        elif scoped and isinstance(v, dict):
            if k not in _known_algos():
                raise ConfigError(f"{key}: '{k}' is not a learning rule (known: {', '.join(_known_algos())})")
            out.setdefault(k, {}).update({str(ok): [_jsonable(x) for x in _as_list(ov)] for ok, ov in v.items()})
        else:
            vals = _as_list(v)
            if not vals:
                raise ConfigError(f"{key}: option '{k}' has an empty list of values")
            out["*"][str(k)] = [_jsonable(x) for x in vals]
    return out


def normalize_spec(raw: dict) -> dict:
    """Check a spec's keys and values; every axis becomes a list of canonical values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a sweep spec must be a table of keys, got {type(raw).__name__}")
    spec: dict[str, Any] = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        k = ALIASES.get(k, k)
        if k in spec:
            raise ConfigError(f"sweep key '{key}' is given twice")
        if k in OPTION_KEYS:
            spec[k] = _norm_options(k, value, scoped=(k == "algo_options"))
            continue
        if k not in AXES and k not in LISTS:
            known = ", ".join(list(LISTS) + list(AXES) + list(OPTION_KEYS))
            raise ConfigError(f"unknown sweep key '{key}' (known: {known})")
        kind = LISTS.get(k) or AXES[k][0]
        vals = _as_list(value)
        if not vals:
            raise ConfigError(f"sweep key '{key}' has an empty list")
        vals = [_coerce(k, v, kind) for v in vals]
        spec[k] = list(dict.fromkeys(vals))  # drop repeats, keep order
    for k in ("widths", "lrs"):
        if k not in spec:
            flag = "--" + k
            raise ConfigError(f"the sweep needs {k} ({flag} ... on the command line, or {k} = [...] in the spec)")
    spec.setdefault("seeds", [0])
    for k, (_, default, _) in AXES.items():
        spec.setdefault(k, [default])
    for k in OPTION_KEYS:
        spec.setdefault(k, {"*": {}})
    return spec


def _grid(options: dict[str, list]) -> list[dict]:
    keys = sorted(options)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(options[k] for k in keys))]


def _resolved_param(g: dict) -> dict:
    d = make_param(g).to_dict()
    d.pop("note", None)
    return _jsonable(d)


def _resolved_algo(g: dict) -> dict:
    """The learning rule's constructor defaults with the given options applied."""
    import inspect

    from .algos import ALGOS
    if g["algo"] not in ALGOS:
        raise ConfigError(f"unknown algorithm '{g['algo']}'; choose one of {', '.join(sorted(ALGOS))}")
    out = {}
    try:
        params = inspect.signature(ALGOS[g["algo"]]).parameters
    except (TypeError, ValueError):
        params = {}
    for name, p in params.items():
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[name] = p.default
    out.update(g["algo_options"], loss=g["loss"])
    safe = {}
    for k, v in out.items():
        try:
            safe[k] = _jsonable(v)
        except ConfigError:
            safe[k] = repr(v)
    return safe


def expand(spec: dict) -> list[dict]:
    """All cells of a spec (configuration dicts with ``width``, ``lr``, ``seed``), without repeats.

    Each cell also records what its preset and learning rule resolve to (``param_resolved``: the
    parameterization's fields; ``algo_resolved``: the rule's options with their defaults), so a cell's hash
    changes when the library changes what a preset name or a default means, and old results are not reused.
    """
    s = normalize_spec(spec)
    keys = list(AXES)
    cells, seen = [], set()
    for combo in itertools.product(*(s[k] for k in keys)):
        base = dict(zip(keys, combo))
        ao_all = s["algo_options"]
        ao = {**ao_all.get("*", {}), **ao_all.get(base["algo"], {})}
        for algo_opts in _grid(ao):
            for param_opts in _grid(s["param_options"].get("*", {})):
                g = {**base, "algo_options": algo_opts, "param_options": param_opts}
                g.update(param_resolved=_resolved_param(g), algo_resolved=_resolved_algo(g))
                for w, lr, seed in itertools.product(s["widths"], s["lrs"], s["seeds"]):
                    cell = {**g, "width": w, "lr": lr, "seed": seed}
                    h = config_hash(cell)
                    if h not in seen:
                        seen.add(h)
                        cells.append(cell)
    return cells


def load_spec_file(path) -> tuple[dict, dict]:
    """Read a TOML spec: its ``[sweep]`` table (the axes) and optional ``[run]`` table (store, executor, ...)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read sweep spec {p}: {e.strerror or e}") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading a TOML spec needs Python >= 3.11 or `pip install tomli`") from None
    try:
        doc = tomllib.loads(text)
    except Exception as e:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{p} is not valid TOML: {e}") from None
    extra = set(doc) - {"sweep", "run"}
    if extra:
        raise ConfigError(f"{p}: unknown top-level key(s) {', '.join(sorted(extra))}: put the axes in a [sweep] "
                          f"table and run options in a [run] table")
    if "sweep" not in doc or not isinstance(doc["sweep"], dict):
        raise ConfigError(f"{p} has no [sweep] table")
    run = doc.get("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"{p}: [run] must be a table")
    bad = set(run) - set(RUN_KEYS)
    if bad:
        raise ConfigError(f"{p}: unknown [run] key(s) {', '.join(sorted(bad))} (known: {', '.join(RUN_KEYS)})")
    return doc["sweep"], run


# ------------------------------------------------------------------------------------------ validation
def _param_overrides(opts: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def make_param(g: dict):
    from .param import preset
    try:
        return preset(g["param"], g["optimizer"], gamma_bar_L=g["gamma_bar_L"], algo=g["algo"],
                      base_width=g["base_width"], **_param_overrides(g["param_options"]))
    except TypeError as e:
        raise ConfigError(f"param_options {g['param_options']}: {e}") from None


def make_rule(g: dict):
    from .algos import make_algo
    try:
        return make_algo(g["algo"], loss=g["loss"], **g["algo_options"])
    except TypeError as e:
        raise ConfigError(f"learning rule '{g['algo']}' does not take option(s) {sorted(g['algo_options'])}: "
                          f"{e}") from None


def validate_group(g: dict) -> None:
    """Raise ConfigError for a group configuration that cannot run, before anything trains."""
    from .data import DATASETS
    from .losses import check_loss
    from .nets import ACTIVATIONS, ARCHS
    from .optim import OPTIMIZERS
    for key, allowed in (("arch", ARCHS), ("activation", ACTIVATIONS), ("dtype", DTYPES), ("dataset", DATASETS),
                         ("optimizer", OPTIMIZERS)):
        if g[key] not in allowed:
            raise ConfigError(f"unknown {key} '{g[key]}'; choose one of {', '.join(allowed)}")
    check_loss(g["loss"])
    if g["depth"] < 2:
        raise ConfigError(f"depth must be at least 2, got {g['depth']}")
    if not 0 <= g["momentum"] < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {g['momentum']}")
    make_param(g)
    make_rule(g)


# ------------------------------------------------------------------------------------------ workers
_DATA: dict[tuple, Any] = {}


def get_dataset(name, data_dir, train_subset, test_subset, data_seed, download=True):
    """Load a dataset once per process (the key includes every argument)."""
    from .data import load_dataset
    key = (name, None if data_dir is None else str(data_dir), train_subset, test_subset, data_seed, bool(download))
    if key not in _DATA:
        if len(_DATA) >= 4:
            _DATA.pop(next(iter(_DATA)))
        _DATA[key] = load_dataset(name, data_dir, train_subset=train_subset, test_subset=test_subset,
                                  seed=data_seed, download=download)
    return _DATA[key]


def _data_of(g: dict, task: dict):
    return get_dataset(g["dataset"], task.get("data_dir"), g["train_subset"], g["test_subset"], g["data_seed"],
                       task.get("download", True))


def run_task(task: dict) -> dict:
    """Train one chunk of a group (K cells as K replicas). Never raises: failures come back as ``error``."""
    try:
        import torch

        from .nets import build
        from .train import Trainer, TrainConfig

        g, cells = task["config"], task["cells"]
        data = _data_of(g, task)
        param, rule = make_param(g), make_rule(g)
        lrs, seeds = [c["lr"] for c in cells], [c["seed"] for c in cells]
        dtype = {"float32": torch.float32, "float64": torch.float64}[g["dtype"]]
        t0 = time.perf_counter()
        net = build(g["arch"], data.input_shape, data.n_classes, g["width"], param, depth=g["depth"],
                    activation=g["activation"], bias=g["bias"], K=len(cells), seeds=seeds, dtype=dtype,
                    device=task.get("device", "cpu"))
        cfg = TrainConfig(epochs=g["epochs"], batch_size=g["batch_size"], lr=lrs, optimizer=g["optimizer"],
                          momentum=g["momentum"], weight_decay=g["weight_decay"], max_steps=g["max_steps"],
                          eval_batch_size=task.get("eval_batch_size", 2000), progress=False)
        res = Trainer(net, rule, data, cfg, seeds=seeds).run()
        seconds = time.perf_counter() - t0
        out = []
        for c, r in zip(cells, res["replicas"]):
            hist = []
            for h in r["history"]:  # up to the epoch it diverged in: the same whichever cells it was batched with
                hist.append({k: v for k, v in h.items() if k != "replica"})
                if h.get("status") == "diverged" and "event" not in h:
                    break
            out.append({"hash": c["hash"], "status": "diverged" if r["status"] == "diverged" else "done",
                        "train_loss": r["train_loss"], "test_loss": r["test_loss"],
                        "test_accuracy": r["test_accuracy"], "history": hist})
        return {"ok": True, "results": out, "seconds": seconds, "replicas": len(cells), "host": socket.gethostname()}
    except MulocalError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # out of memory, a bug in a learning rule, ...
        return {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}


def _init_worker(threads: int, parent: int) -> None:
    import threading

    import torch
    torch.set_num_threads(max(1, int(threads)))

    def watchdog():  # exit when the sweep process is gone (e.g. kill -9): nobody would read our results
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)
    threading.Thread(target=watchdog, daemon=True).start()


def _ray_task(task: dict, threads: int) -> dict:
    import torch
    torch.set_num_threads(max(1, int(threads)))
    return run_task(task)


# ------------------------------------------------------------------------------------------ executors
class _Ready:
    def __init__(self, value):
        self.value = value


class InlineExecutor:
    """Runs each task in this process when it is submitted (with ``threads`` torch threads, if given)."""

    name = "inline"
    capacity = 1

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def submit(self, task):
        if not self.threads:
            return _Ready(run_task(task))
        import torch
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return _Ready(run_task(task))
        finally:
            torch.set_num_threads(before)

    def wait(self, handles, timeout=None):
        return [(h, h.value) for h in handles]

    def close(self, cancel=False):
        pass


class LocalExecutor:
    """A pool of spawned worker processes."""

    name = "local"

    def __init__(self, workers: int, threads: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        self.capacity, self.threads = workers, threads
        self._new = lambda: ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(threads, os.getpid()))
        self.pool = self._new()

    def submit(self, task):
        from concurrent.futures.process import BrokenProcessPool
        try:
            return self.pool.submit(run_task, task)
        except BrokenProcessPool:  # a worker died (its tasks come back failed): go on with a fresh pool
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new()
            return self.pool.submit(run_task, task)

    def wait(self, handles, timeout=None):
        from concurrent.futures import FIRST_COMPLETED, wait
        done, _ = wait(list(handles), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            try:
                out.append((f, f.result()))
            except Exception as e:  # BrokenProcessPool: a worker died (out of memory, killed)
                out.append((f, {"ok": False, "error": f"worker process failed: {type(e).__name__}: {e}"}))
        return out

    def close(self, cancel=False):
        self.pool.shutdown(wait=not cancel, cancel_futures=True)


class RayExecutor:
    """Ray tasks, on a local instance (started here) or an existing cluster (``address``)."""

    name = "ray"

    def __init__(self, address: str | None, workers: int | None, threads: int):
        try:
            import ray
        except ImportError:
            raise ConfigError("the Ray executor needs Ray: pip install 'mulocal[ray]'") from None
        self.ray, self.threads, self.started = ray, threads, False
        if address:
            _check_reachable(address)
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            try:
                if address:
                    ray.init(address=address, **kw)
                else:
                    ray.init(num_cpus=(workers or os.cpu_count() or 1) * threads, **kw)
            except Exception as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ConfigError(f"cannot start or reach {where}: {type(e).__name__}: {e}".splitlines()[0]) from None
            self.started = True
        self.remote = ray.remote(num_cpus=threads, max_retries=0)(_ray_task)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = max(1, workers or cpus // threads)

    def submit(self, task):
        return self.remote.remote(task, self.threads)

    def wait(self, handles, timeout=None):
        ready, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        out = []
        for r in ready:
            try:
                out.append((r, self.ray.get(r)))
            except Exception as e:  # a worker died
                out.append((r, {"ok": False, "error": f"Ray task failed: {type(e).__name__}: {e}".splitlines()[0]}))
        return out

    def close(self, cancel=False):
        if self.started:
            self.ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) when a 'host:port' or 'ray://host:port' Ray address does not answer: ray.init would
    retry for minutes."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" or another form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def make_executor(executor: str, workers: int | None, ray_address: str | None = None, threads: int | None = None):
    """``workers``: parallel tasks (None: one per core; 0: this process). ``threads``: torch threads per task
    (None: cores // workers; in this process: unchanged)."""
    cores = os.cpu_count() or 1
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor '{executor}'; choose one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if executor == "ray":
        return RayExecutor(ray_address, workers or None, threads or (max(1, cores // workers) if workers else 1))
    if workers == 0:
        return InlineExecutor(threads)
    workers = workers or cores
    return LocalExecutor(workers, threads or max(1, cores // workers))


# ------------------------------------------------------------------------------------------ planning
def replica_bytes(g: dict, input_shape: Sequence[int], n_classes: int, eval_batch: int = 2000) -> int:
    """A rough upper estimate of the memory one replica of group ``g`` needs while training."""
    item = 8 if g["dtype"] == "float64" else 4
    W, L = g["width"], g["depth"]
    in_dim = math.prod(input_shape)
    if g["arch"] == "cnn" and len(input_shape) == 3:
        c, h, w = input_shape
        params, acts = 0, 0
        for _ in range(L - 1):
            params += c * 9 * W + W
            acts += W * h * w
            c, h, w = W, max(h // 2, 1), max(w // 2, 1)
        params += W * h * w * n_classes + n_classes
        acts += n_classes
    else:
        dims = [in_dim] + [W] * (L - 1) + [n_classes]
        params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
        acts = sum(dims[1:])
    buffers = 2 if g["optimizer"] == "adam" else (1 if g["momentum"] else 0)
    state = params * (2 + buffers)
    per_sample = (acts + in_dim) * (2 if g["algo"] == "bp" else 4)
    return item * (state + (g["batch_size"] + eval_batch) * per_sample)


def task_cost(g: dict, n_cells: int, n_train: int, input_shape, n_classes) -> float:
    steps = math.ceil(n_train / g["batch_size"])
    if g["max_steps"]:
        steps = min(steps, g["max_steps"])
    return float(n_cells) * g["epochs"] * steps * replica_bytes(g, input_shape, n_classes, 0)


def _default_budget(workers: int) -> int:
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 8 << 30
    return int(min(4 << 30, phys / (2 * max(workers, 1))))


def plan(cells: Sequence[dict], shapes: dict, max_replicas: int = 64, memory_budget: int | None = None,
         capacity: int = 1, eval_batch: int = 2000) -> list[dict]:
    """Tasks: chunks of groups, each {"config", "cells": [{"hash", "lr", "seed"}], "cost"}, costliest first.

    ``shapes`` maps a group's data key to (input_shape, n_classes, n_train). Groups are split into the
    fewest chunks that fit ``max_replicas`` and the memory budget (per task); then, for ``capacity`` > 1
    parallel workers, the costliest chunks are halved until every worker has a task and no chunk costs
    more than a worker's share of the total.
    """
    budget = memory_budget or _default_budget(capacity)
    groups: dict[str, tuple[dict, list]] = {}
    for c in cells:
        g = group_of(c)
        groups.setdefault(config_hash(g), (g, []))[1].append(c)
    tasks = []
    for g, members in groups.values():
        in_shape, n_classes, n_train = shapes[_data_key(g)]
        per = replica_bytes(g, in_shape, n_classes, eval_batch)
        kmax = max(1, min(int(max_replicas), budget // max(per, 1)))
        members = sorted(members, key=lambda c: (c["lr"], c["seed"]))
        n_chunks = math.ceil(len(members) / kmax)
        for part in _split(members, n_chunks):
            tasks.append({"config": g, "cells": [{"hash": config_hash(c), "lr": c["lr"], "seed": c["seed"]}
                                                 for c in part],
                          "cost": task_cost(g, len(part), n_train, in_shape, n_classes)})
    total = sum(t["cost"] for t in tasks)
    while tasks and capacity > 1:  # balance: no task bigger than a worker's share, and every worker busy
        big = max(tasks, key=lambda t: t["cost"])
        if len(big["cells"]) < 2 or (len(tasks) >= capacity and big["cost"] <= total / capacity):
            break
        tasks.remove(big)
        for part in _split(big["cells"], 2):
            tasks.append({"config": big["config"], "cells": part, "cost": big["cost"] * len(part) / len(big["cells"])})
    tasks.sort(key=lambda t: -t["cost"])
    return tasks


def _split(items: list, n: int) -> list[list]:
    n = max(1, min(n, len(items)))
    q, r = divmod(len(items), n)
    out, i = [], 0
    for j in range(n):
        size = q + (1 if j < r else 0)
        out.append(items[i:i + size])
        i += size
    return out


def _data_key(g: dict) -> tuple:
    return (g["dataset"], g["train_subset"], g["test_subset"], g["data_seed"])


# ------------------------------------------------------------------------------------------ running
def run_sweep(spec: dict, store, *, executor: str = "local", workers: int | None = None,
              ray_address: str | None = None, threads: int | None = None, max_replicas: int = 64,
              memory_budget_mb: float | None = None, device: str = "cpu", data_dir=None, download: bool = True,
              eval_batch_size: int = 2000, progress: bool = True, reset_running: bool = False,
              dry_run: bool = False) -> dict:
    """Add the spec's cells to ``store`` (a path or a Store) and run every one not finished yet.

    Returns a summary: counts of cells (in the spec, new, finished before, run now by status), tasks,
    seconds and cells per minute. Failed cells (an error in the worker) are run again by the next sweep.
    """
    t_start = time.perf_counter()
    own = isinstance(store, (str, os.PathLike))
    # an existing store is checked first (a corrupt or foreign file fails fast); a new one is created only for a
    # spec that validates
    st = Store(store) if own and Path(store).exists() else (None if own else store)
    try:
        return _checked_run(spec, st, store, executor, workers, ray_address, threads, max_replicas, memory_budget_mb,
                            device, data_dir, download, eval_batch_size, progress, reset_running, dry_run, t_start)
    finally:
        if own and st is not None:
            st.close()


def _checked_run(spec, st, store, executor, workers, ray_address, threads, max_replicas, memory_budget_mb, device,
                 data_dir, download, eval_batch_size, progress, reset_running, dry_run, t_start):
    cells = expand(spec)
    if isinstance(max_replicas, bool) or not isinstance(max_replicas, int) or max_replicas < 1:
        raise ConfigError(f"max replicas must be a positive integer, got {max_replicas!r}")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor '{executor}'; choose one of {', '.join(EXECUTORS)}")
    for name, v, lo in (("workers", workers, 0), ("threads", threads, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("the Ray executor needs Ray: pip install 'mulocal[ray]'") from None
        if ray_address:
            _check_reachable(ray_address)
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but no CUDA device is available")
    groups = {config_hash(group_of(c)): group_of(c) for c in cells}
    for g in groups.values():
        validate_group(g)
    shapes = {}
    for g in groups.values():
        key = _data_key(g)
        if key not in shapes:
            d = get_dataset(g["dataset"], data_dir, g["train_subset"], g["test_subset"], g["data_seed"], download)
            shapes[key] = (d.input_shape, d.n_classes, len(d.x_train))
    if st is None:
        st = Store(store)
        try:
            return _run(st, cells, shapes, executor, workers, ray_address, threads, max_replicas, memory_budget_mb,
                        device, data_dir, download, eval_batch_size, progress, reset_running, dry_run, t_start,
                        len(groups))
        finally:
            st.close()
    return _run(st, cells, shapes, executor, workers, ray_address, threads, max_replicas, memory_budget_mb, device,
                data_dir, download, eval_batch_size, progress, reset_running, dry_run, t_start, len(groups))


def _run(st, cells, shapes, executor, workers, ray_address, threads, max_replicas, memory_budget_mb, device, data_dir,
         download, eval_batch_size, progress, reset_running, dry_run, t_start, n_groups):
    hashes = [config_hash(c) for c in cells]
    n_new = st.add_cells(cells)
    n_reset = st.reset_stale(force=reset_running)
    status = {r["hash"]: r["status"] for r in st.rows(hashes=hashes, columns=("hash", "status"))}
    todo = [c for c, h in zip(cells, hashes) if status[h] in ("pending", "failed")]
    finished_before = sum(1 for h in hashes if status[h] in ("done", "diverged"))
    busy_elsewhere = sum(1 for h in hashes if status[h] == "running")
    summary = {"store": str(st.path), "cells": len(cells), "groups": n_groups, "new": n_new,
               "finished_before": finished_before, "reset_running": n_reset, "to_run": len(todo)}
    if dry_run:
        capacity = 1 if (executor == "local" and workers == 0) else (workers or os.cpu_count() or 1)
        budget = int(memory_budget_mb * 2 ** 20) if memory_budget_mb else None
        tasks = plan(todo, shapes, max_replicas, budget, capacity, eval_batch_size)
        summary.update(dry_run=True, tasks=len(tasks), replicas_per_task=[len(t["cells"]) for t in tasks])
        return summary
    budget = int(memory_budget_mb * 2 ** 20) if memory_budget_mb else None
    cores = os.cpu_count() or 1
    capacity = 1 if (executor == "local" and workers == 0) else (workers or cores)
    tasks = plan(todo, shapes, max_replicas, budget, capacity, eval_batch_size)
    if executor == "local" and workers != 0 and tasks:  # no more processes than tasks
        workers = min(workers or cores, len(tasks))
        threads = threads or max(1, cores // workers)
    ex = make_executor(executor, workers, ray_address, threads) if tasks else None
    counts = {"done": 0, "diverged": 0, "failed": 0, "skipped": 0}
    errors: list[str] = []
    owner = owner_token()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cells), initial=finished_before, desc="sweep", unit="cell", file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.05)
    t_run = time.perf_counter()
    queue, inflight, claimed = list(tasks), {}, set()
    extra = {"device": device, "data_dir": None if data_dir is None else str(data_dir), "download": download,
             "eval_batch_size": eval_batch_size}
    try:
        while queue or inflight:
            while queue and len(inflight) < ex.capacity:
                t = queue.pop(0)
                got = set(st.claim([c["hash"] for c in t["cells"]], owner))
                counts["skipped"] += len(t["cells"]) - len(got)
                if not got:
                    continue
                t = {**t, "cells": [c for c in t["cells"] if c["hash"] in got], **extra}
                claimed |= got
                inflight[ex.submit(t)] = t
            if not inflight:
                continue
            for h, res in ex.wait(list(inflight), timeout=None):
                t = inflight.pop(h)
                mine = [c["hash"] for c in t["cells"]]
                if res.get("ok"):
                    st.finish(res["results"], seconds=res["seconds"], replicas=res["replicas"], host=res.get("host"))
                    for r in res["results"]:
                        counts[r["status"]] += 1
                else:
                    st.fail(mine, res["error"])
                    counts["failed"] += len(mine)
                    if res["error"] not in errors:
                        errors.append(res["error"])
                claimed -= set(mine)
                if bar is not None:
                    bar.update(len(mine))
                    bar.set_postfix(diverged=counts["diverged"], failed=counts["failed"], refresh=False)
    except BaseException:
        if claimed:
            try:
                st.release(claimed)
            except MulocalError:
                pass
        if ex is not None:
            ex.close(cancel=True)
        if bar is not None:
            bar.close()
        raise
    if ex is not None:
        ex.close()
    if bar is not None:
        bar.close()
    ran = counts["done"] + counts["diverged"] + counts["failed"]
    run_s = time.perf_counter() - t_run
    after = st.counts(hashes)
    summary.update(
        executor=(ex.name if ex else executor), workers=(ex.capacity if ex else 0), tasks=len(tasks), ran=ran,
        done=counts["done"], diverged=counts["diverged"], failed=counts["failed"],
        skipped_claimed_elsewhere=counts["skipped"] + busy_elsewhere, errors=errors[:5],
        seconds=time.perf_counter() - t_start, run_seconds=run_s,
        cells_per_minute=(60.0 * ran / run_s) if ran and run_s > 0 else None,
        store_counts=after, complete=(after["done"] + after["diverged"] == len(cells)))
    return summary


def format_summary(s: dict) -> str:
    if s.get("dry_run"):
        return (f"sweep (dry run): {s['cells']} cells in {s['groups']} groups, {s['new']} not yet in {s['store']}, "
                f"{s['to_run']} to run as {s['tasks']} tasks (replicas per task: {s['replicas_per_task']})")
    lines = [f"sweep: {s['cells']} cells in {s['groups']} groups; {s['finished_before']} already finished in "
             f"{s['store']}, {s['ran']} run now in {s['tasks']} tasks ({s['executor']}, {s['workers']} at a time)"]
    if s["ran"]:
        lines.append(f"  {s['done']} done, {s['diverged']} diverged, {s['failed']} failed in {s['run_seconds']:.1f} s "
                     f"({s['cells_per_minute']:.1f} cells/min)")
    if s["skipped_claimed_elsewhere"]:
        lines.append(f"  {s['skipped_claimed_elsewhere']} cells are being run by another sweep process "
                     f"(if none is running, start again with --reset-running)")
    for e in s["errors"]:
        lines.append(f"  error: {e}")
    if s["failed"]:
        lines.append("  failed cells are run again by the next `mulocal sweep` with the same spec")
    c = s["store_counts"]
    lines.append(f"  store: {c['done']} done, {c['diverged']} diverged, {c['failed']} failed, {c['pending']} pending, "
                 f"{c['running']} running" + ("  (complete)" if s["complete"] else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line
def _list_of(kind: str):
    def parse(text: str):
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("expected at least one value")
        try:
            return [_coerce("value", p, kind) for p in parts]
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).replace("sweep key 'value'", "each value")) from None
    return parse


def _log2_range(text: str) -> list[float]:
    """'A:B[:S]' -> 2^A, 2^(A+S), ..., 2^B (exponents may be fractional)."""
    try:
        parts = [float(p) for p in text.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
        a, b = parts[0], parts[1]
        step = parts[2] if len(parts) == 3 else 1.0
        if step <= 0 or b < a:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP[:STEP] log2 exponents with START <= STOP, got {text!r}"
                                         ) from None
    n = int(math.floor((b - a) / step + 1e-9)) + 1
    return [2.0 ** (a + i * step) for i in range(n)]


def _parse_value(text: str):
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _option(text: str) -> tuple[str | None, str, list]:
    """'[algo.]KEY=V1[,V2...]' -> (scope, key, values)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,VALUE...], got {text!r}")
    key, _, vals = text.partition("=")
    scope, _, key = key.strip().rpartition(".")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,VALUE...], got {text!r}")
    values = [_parse_value(v) for v in vals.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"option {key} has no value")
    return (scope or None), key, values


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default=None, help="a TOML file with a [sweep] table (and optionally a [run] table)")
    p.add_argument("--store", default=None, help="the SQLite store to add the cells to and resume from")
    a = p.add_argument_group("axes (comma-separated values are swept; they override the spec file)")
    a.add_argument("--widths", dest="ax_widths", type=_list_of("int"), default=None, metavar="W[,W...]",
                   help="widths, e.g. 64,128,256")
    a.add_argument("--lrs", dest="ax_lrs", type=_list_of("lr"), default=None, metavar="LR[,LR...]",
                   help="base learning rates")
    a.add_argument("--log2-lrs", dest="log2_lrs", type=_log2_range, default=None, metavar="START:STOP[:STEP]",
                   help="learning rates 2^START..2^STOP, e.g. --log2-lrs=-6:2 or --log2-lrs=-6:2:0.5 (write the '=' "
                        "when START is negative); instead of --lrs")
    a.add_argument("--seeds", dest="ax_seeds", type=_list_of("int0"), default=None, metavar="S[,S...]",
                   help="seeds (default 0)")
    for key, (kind, default, help_) in AXES.items():
        if key == "bias":
            continue
        flag = "--" + key.replace("_", "-")
        a.add_argument(flag, dest="ax_" + key, type=_list_of(kind), default=None, metavar="V[,V...]",
                       help=f"{help_} (default {default})")
    a.add_argument("--no-bias", dest="ax_bias", action="store_const", const=[False], default=None,
                   help="layers without biases")
    a.add_argument("--algo-opt", dest="algo_opt", type=_option, action="append", default=[],
                   metavar="[ALGO.]KEY=V[,V...]", help="an option of the learning rule, e.g. pc.T=1,4 (repeatable)")
    a.add_argument("--param-opt", dest="param_opt", type=_option, action="append", default=[],
                   metavar="KEY=V[,V...]", help="a parameterization field override, e.g. gamma_L_prime=1,2")
    r = p.add_argument_group("running")
    r.add_argument("--executor", default=None, choices=EXECUTORS, help="local process pool (default) or ray")
    r.add_argument("--workers", type=int, default=None,
                   help="parallel tasks (default: one per core; 0 = run in this process)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads per task (default: cores // workers; with --workers 0: unchanged)")
    r.add_argument("--ray-address", default=None, help="address of a running Ray cluster (default: start one here)")
    r.add_argument("--max-replicas", type=int, default=None, help="most cells trained as one batched model (64)")
    r.add_argument("--memory-budget-mb", type=float, default=None,
                   help="memory per task used to size the replica chunks (default: RAM / (2 workers), <= 4 GiB)")
    r.add_argument("--device", default=None, help="cpu (default) or cuda")
    r.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    r.add_argument("--no-download", action="store_true", help="never try to download data")
    r.add_argument("--reset-running", action="store_true",
                   help="also take over cells marked running by another (crashed) sweep process")
    r.add_argument("--dry-run", action="store_true", help="only add the cells and show the plan")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def spec_from_args(args) -> tuple[dict, dict]:
    """The sweep spec and run options from parsed ``mulocal sweep`` arguments (file first, flags override)."""
    spec, run = ({}, {}) if not args.spec else load_spec_file(args.spec)
    spec = {ALIASES.get(str(k).replace("-", "_"), str(k).replace("-", "_")): v for k, v in spec.items()}
    for key in list(LISTS) + list(AXES):
        v = getattr(args, "ax_" + key, None)
        if v is not None:
            spec[key] = v
    if args.log2_lrs is not None:
        if args.ax_lrs is not None:
            raise ConfigError("give --lrs or --log2-lrs, not both")
        spec["lrs"] = args.log2_lrs
    for key, given in (("algo_options", args.algo_opt), ("param_options", args.param_opt)):
        if not given:
            continue
        opts = dict(spec.get(key) or {})
        for scope, k, values in given:
            if scope is None:
                opts[k] = values
            elif key == "param_options":
                raise ConfigError(f"--param-opt takes KEY=VALUE, got a scope '{scope}.'")
            else:
                sub = dict(opts.get(scope) or {})
                sub[k] = values
                opts[scope] = sub
        spec[key] = opts
    for key in RUN_KEYS:
        v = getattr(args, key, None)
        if v is not None:
            run[key] = v
    return spec, run


def cmd_sweep(args) -> dict:
    spec, run = spec_from_args(args)
    store = run.get("store")
    if not store:
        raise ConfigError("give the store: --store PATH (a SQLite file; created if missing)")
    summary = run_sweep(spec, store, executor=run.get("executor", "local"), workers=run.get("workers"),
                        ray_address=run.get("ray_address"), threads=run.get("threads"),
                        max_replicas=run.get("max_replicas", 64),
                        memory_budget_mb=run.get("memory_budget_mb"), device=run.get("device", "cpu"),
                        data_dir=run.get("data_dir"), download=not args.no_download,
                        eval_batch_size=run.get("eval_batch_size", 2000), progress=not args.no_progress,
                        reset_running=args.reset_running, dry_run=args.dry_run)
    if not args.json:
        print(format_summary(summary))
        if summary.get("complete"):
            from .analysis import analyze, format_table
            with Store(store, create=False) as st:
                rep = analyze(st.rows(hashes=[config_hash(c) for c in expand(spec)]))
            if rep["families"]:
                print()
                print(format_table(rep))
    return summary


def _report_from_args(args):
    from .analysis import analyze
    with Store(args.store, create=False) as st:
        rep = analyze(st.rows(), metric=args.metric)
        results = st.results()
        if results:
            rep["results"] = results
        if getattr(args, "csv", None):
            rep["csv"] = str(args.csv)
            rep["csv_rows"] = st.export_csv(args.csv)
    rep["store"] = str(args.store)
    return rep


def cmd_report(args) -> dict:
    from .analysis import format_table
    rep = _report_from_args(args)
    if not args.json:
        if rep["families"] or not rep.get("results"):
            print(format_table(rep))
        for name, res in rep.get("results", {}).items():
            print(f"{name}: " + json.dumps(res.get("summary", res), indent=1))
        if rep.get("csv"):
            print(f"csv: {rep['csv']} ({rep['csv_rows']} rows)")
    return rep


def cmd_plot(args) -> dict:
    from .plots import plot_report
    rep = _report_from_args(args)
    out = args.out or str(Path(args.store).with_suffix("")) + "_plots"
    paths = plot_report(rep, out)
    if not args.json:
        for p in paths:
            print(p)
    return {"store": str(args.store), "out": str(out), "plots": paths, "metric": rep["metric"]}


def register_cli(subparsers) -> None:
    """Add ``sweep``, ``report`` and ``plot`` to an argparse subparsers object."""
    from .analysis import METRICS
    s = subparsers.add_parser("sweep", help="run a grid of widths x learning rates x seeds x ... into a store",
                              description="Run every cell of a sweep not yet finished in the store. Learning rates "
                                          "and seeds of one configuration train as replicas of one batched model.")
    _add_sweep_args(s)
    s.set_defaults(func=cmd_sweep)
    r = subparsers.add_parser("report", help="best LR per width, transfer slope and penalty from a sweep store")
    r.add_argument("--store", required=True, help="the sweep's SQLite store")
    r.add_argument("--metric", default="train_loss", choices=METRICS,
                   help="what picks the best LR (default train_loss, averaged over seeds)")
    r.add_argument("--csv", default=None, help="also export every cell to this CSV file")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)
    p = subparsers.add_parser("plot", help="write loss / accuracy vs learning rate plots of a sweep store")
    p.add_argument("--store", required=True, help="the sweep's SQLite store")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: next to the store)")
    p.add_argument("--metric", default="train_loss", choices=METRICS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plot)




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mulocal.sweep", description="mulocal sweeps: sweep, report, plot")
    sub = parser.add_subparsers(dest="command")
    register_cli(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from .cli import dispatch
    return dispatch(args)


__all__ = ["AXES", "expand", "normalize_spec", "load_spec_file", "run_sweep", "run_task", "plan", "register_cli",
           "make_executor", "format_summary", "main"]

if __name__ == "__main__":
    from mulocal import sweep as _sweep  # the importable module, so worker processes find run_task
    sys.exit(_sweep.main())
