"""Helpers shared by the benchmark scripts in this folder (not a benchmark itself).

The scripts import it as ``from _common import ...``: a script run as ``python benchmarks/bench_X.py``
has its own folder on ``sys.path``. Importing this module also makes ``mulocal`` importable from a
checkout that is not installed (it then adds ``../src`` to ``sys.path``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

try:
    import mulocal
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import mulocal

from mulocal.data import Dataset, load_dataset
from mulocal.errors import ConfigError, DataError

BATCH = 128
DEPTH = 3  # weight layers of the MLP 784 -> M -> M -> 10 of bench_pc, bench_step and bench_tp
SPREAD_WARN = 1.5  # repeats of one measurement differing by more than this factor get a warning
BUSY_HINT = ("the machine may be busy (other processes compete with torch's threads), so compare with care "
             "or rerun")
SYNTHETIC_N_TEST = 16  # test samples of the synthetic fallback when no ``n_eval`` is asked for


# ----------------------------------------------------------------------------------------- data
def get_data(name: str, data_dir: str | None, download: bool,
             n_eval: int | None = None) -> tuple[Dataset, str, str]:
    """(dataset, description, note); random tensors of FashionMNIST's shape if it cannot be loaded.

    With ``n_eval`` the test set is cut to its first ``n_eval`` samples (the Trainer's end-of-epoch
    evaluation then stays cheap); the synthetic fallback has ``n_eval`` (else 16) test samples.
    """
    if name == "fashion-mnist":
        try:
            ds = load_dataset("fashion-mnist", data_dir, download=download)
            if n_eval is not None:
                ds = Dataset(ds.name, ds.x_train, ds.y_train, ds.x_test[:n_eval], ds.y_test[:n_eval], ds.n_classes,
                             source=ds.source)
            return ds, f"fashion-mnist ({ds.source})", ""
        except (DataError, ConfigError, OSError) as err:
            note = (f"FashionMNIST could not be loaded ({err}); using random synthetic data of the same shape "
                    "(60000, 1, 28, 28), 10 classes")
    else:
        note = "--dataset synthetic: random data of shape (60000, 1, 28, 28), 10 classes"
    n_test = SYNTHETIC_N_TEST if n_eval is None else n_eval
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60000, 1, 28, 28, generator=g), torch.randint(0, 10, (60000,), generator=g)
    xt, yt = torch.randn(n_test, 1, 28, 28, generator=g), torch.randint(0, 10, (n_test,), generator=g)
    return Dataset("synthetic-784", x, y, xt, yt, 10, source="random"), "synthetic random (60000, 1, 28, 28)", note


def load_data(args: argparse.Namespace, n_eval: int | None = None) -> tuple[Dataset, str, str]:
    """:func:`get_data` for the parsed ``--dataset``, ``--data-dir`` and ``--download``; prints the note."""
    data, desc, note = get_data(args.dataset, args.data_dir, args.download, n_eval)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return data, desc, note


# ---------------------------------------------------------------------------------- environment
def cpu_cores() -> int | None:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: str = "cpu", **extra) -> dict:
    """The ``env`` entry of a result: versions, machine, cores, torch threads, device; ``extra`` appended."""
    name = str(device)
    if name.startswith("cuda"):
        name = f"{name} ({torch.cuda.get_device_name(torch.device(name))})"
    return dict(torch=torch.__version__, mulocal=getattr(mulocal, "__version__", "?"),
                python=platform.python_version(), machine=platform.machine(), cpu_cores=cpu_cores(),
                torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
                device=name, **extra)


def env_line(env: dict) -> str:
    """The table's line about torch, the machine and the threads."""
    return (f"torch {env['torch']} on {env['machine']}, {env['cpu_cores']} cores available, torch threads "
            f"{env['torch_threads']} (interop {env['torch_interop_threads']}), device {env.get('device', 'cpu')}")


def data_line(r: dict) -> str:
    """The table's line about the data set (with the fallback note, if any)."""
    return f"data: {r['dataset']}" + (f"  [NOTE: {r['dataset_note']}]" if r["dataset_note"] else "")


# --------------------------------------------------------------------------------------- timing
def best(fn, repeats: int):
    """Run ``fn`` ``repeats`` times; return (fastest result, all times). ``fn`` returns (seconds, extra...)."""
    results = [fn() for _ in range(repeats)]
    times = [r[0] if isinstance(r, tuple) else r for r in results]
    i = min(range(len(times)), key=times.__getitem__)
    return results[i], times


def interleaved(jobs: dict, repeats: int) -> dict:
    """Run every job once per round, ``repeats`` rounds; {name: [results]}. A job returns seconds or (seconds, ...)."""
    out = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            out[name].append(fn())
    return out


def shuffled_steps(step, n_samples: int, seed: int, device: str, batch: int = BATCH):
    """A timing job for a plain training loop: ``train(n)`` draws one seeded shuffle of the ``n_samples`` training
    samples (inside the timing, as the Trainer's epoch does), calls ``step(idx)`` on its first ``n`` batches of
    ``batch`` indices and returns the seconds. ``step`` reads its loss back (``.item()``), as a plain loop that
    logs it does; that read also waits for a GPU's work."""
    import time
    gen = torch.Generator().manual_seed(seed)

    def train(n: int) -> float:
        t0 = time.perf_counter()
        perm = torch.randperm(n_samples, generator=gen).to(device)
        for i in range(n):
            step(perm[i * batch:(i + 1) * batch])
        return time.perf_counter() - t0
    return train


class KeptTrainer:
    """A timing job on one Trainer kept across repeats: built with ``cfg`` (``cfg.max_steps`` = the warm-up steps;
    a compiled step compiles there) and warmed up at once (``warmup_s``); each call then trains one more epoch of
    ``steps`` steps and returns its seconds (the Trainer's ``epoch_time``: training steps only)."""

    def __init__(self, net, rule, data, cfg, seeds, steps: int):
        import time

        from mulocal.train import Trainer
        self.trainer, self.steps = Trainer(net, rule, data, cfg, seeds=seeds), steps
        t0 = time.perf_counter()
        self.trainer.run()
        self.warmup_s = time.perf_counter() - t0
        cfg.max_steps = steps

    def __call__(self) -> float:
        self.trainer.cfg.epochs += 1
        self.result = self.trainer.run()
        rows = [h for h in self.result["replicas"][0]["history"] if "event" not in h]
        return rows[-1]["epoch_time"]


def per_epoch(seconds: float, steps: int, steps_per_epoch: int) -> float:
    return seconds / steps * steps_per_epoch


def spread(times: list[float]) -> float:
    """Slowest / fastest of the repeats of one measurement."""
    return max(times) / min(times)


# ---------------------------------------------------------------------------------- command line
def parse_ints(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers, or exit with a message naming ``flag``."""
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated positive integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise SystemExit(f"{flag} must be comma-separated positive integers, got {text!r}")
    return vals


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc`` (the script's docstring), kept as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


def add_timing_args(p: argparse.ArgumentParser, steps: int, warmup: int, repeats: int = 3) -> None:
    """--steps, --warmup, --repeats with these defaults."""
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps per measurement (default {steps})")
    p.add_argument("--warmup", type=int, default=warmup,
                   help=f"untimed warm-up steps before each measurement (default {warmup})")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"repeat each measurement, report the fastest (default {repeats})")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--dataset, --data-dir, --download and --json."""
    p.add_argument("--dataset", choices=("fashion-mnist", "synthetic"), default="fashion-mnist",
                   help="fashion-mnist (falls back to synthetic if missing) or synthetic random data of that shape")
    p.add_argument("--data-dir", default=None, help="folder with the FashionMNIST IDX files (default: auto)")
    p.add_argument("--download", action="store_true", help="allow downloading FashionMNIST if it is not found")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device (every benchmark takes it: ``./run.sh bench --device cuda`` passes it to each)."""
    p.add_argument("--device", default="cpu", help="torch device for data, nets and rules (default cpu; cuda)")


def device_error(device: str) -> str | None:
    """None if torch can run on ``device`` here, else the one line that says why not (unknown device, no CUDA)."""
    from mulocal.config import check_device
    try:
        check_device(device)
    except ConfigError as err:
        return str(err)
    return None


def resolve_device(device: str, script: str) -> str:
    """``device`` if torch can use it here; otherwise print one line, ``<script>: error: <why>``, and exit with
    status 2 (no traceback, no usage text)."""
    err = device_error(device)
    if err is not None:
        print(f"{script}: error: {err}", file=sys.stderr)
        raise SystemExit(2)
    return str(device)


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU): time a GPU's work, not its launches."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def print_header(title: str, r: dict, env_suffix: str = "") -> None:
    """The table's first lines: ``title``, the data set line and the environment line (plus ``env_suffix``)."""
    print(title)
    print(data_line(r))
    print(env_line(r["env"]) + env_suffix)


def emit(result: dict, as_json: bool, print_table) -> None:
    """Print ``result`` as one JSON object, or as the script's table."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


# ------------------------------------------------------------------------------------ a peer in a child process
class PCXSide:
    """A peer library's side run as a child process (``script`` with the peer's ``python``, e.g. PCX's JAX):
    started on an .npz of weights, batches and settings, then one JSON object per line on stdout for each command
    on stdin (the protocol: the script's docstring). ``check()`` runs the check steps and returns (losses, the
    weights the child wrote to ``out``); ``time(n)`` the seconds of n steps; ``close()`` ends it."""

    def __init__(self, python: str, script, npz, out, extra_args=(), env=None):
        from pathlib import Path
        import subprocess
        self.err_path, self.out = Path(npz).with_suffix(".stderr"), out
        self._err = open(self.err_path, "w")
        try:
            self.proc = subprocess.Popen([python, str(script), "--npz", str(npz), "--out", str(out), *extra_args],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                         env=env)
        except OSError as err:
            raise RuntimeError(f"cannot start the PCX side with {python}: {err}") from None
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            self._err.flush()
            tail = self.err_path.read_text()[-2000:].strip()
            raise RuntimeError(f"the PCX side stopped (status {self.proc.returncode}): {tail}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"the PCX side: {msg['error']}")
        return msg

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def check(self) -> tuple[list[float], list]:
        import numpy as np
        losses = self.ask("check")["losses"]
        with np.load(self.out) as z:
            weights = [z[f"arr_{i}"] for i in range(len(z.files))]
        return losses, weights

    def time(self, n: int) -> float:
        return self.ask(f"time {n}")["seconds"]

    def close(self) -> None:
        import subprocess
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        finally:
            self._err.close()
