"""Sweeps: cross products of run configurations, trained as batched replicas into a resumable store.

One concern a module:

    spec.py       the spec (keys -> values or lists), its expansion into cells, TOML spec files
    plan.py       groups of cells -> tasks of K replicas within a memory budget
    worker.py     one task: ``config.assemble`` + ``Trainer``, results back as plain dicts
    executors.py  inline, local process pool, Ray
    runner.py     ``run_sweep(spec, store, SweepOptions)``: add, claim, run, record; the summary
    store.py      the SQLite store (one row per cell, resumable, kill -9 safe)
    transfer.py   the muTransfer analysis: best LR per width, slope, penalty

All learning rates and seeds of one configuration train together as the K replicas of one batched model;
each replica has its own seeded initialisation and data order, so a cell's numbers do not depend on which
cells it was batched with, nor on the executor, beyond rounding: bitwise for the same batch shapes and thread
count on the same CPU; batched with other cells (another K), or with other threads or another CPU's kernels,
sums may be split and rounded differently, at the rounding level of the cell's dtype (tests/tolerances.py).
The command line is ``mulocal sweep | report | plot`` (``cli/sweeps.py``).
"""
from .executors import EXECUTORS, make_executor
from .plan import plan, replica_bytes
from .runner import SweepOptions, format_summary, run_sweep
from .spec import ALIASES, LISTS, RUN_KEYS, expand, load_spec_file, normalize_spec
from .store import Store, StoreError
from .worker import run_task

__all__ = ["ALIASES", "EXECUTORS", "LISTS", "RUN_KEYS", "Store", "StoreError", "SweepOptions", "expand",
           "format_summary", "load_spec_file", "make_executor", "normalize_spec", "plan", "replica_bytes",
           "run_sweep", "run_task"]
