"""Sweeps: cross products of run configurations, trained as batched replicas into a resumable store.

One concern a module:

    spec.py       the spec (keys -> values or lists), its expansion into cells, TOML spec files
    plan.py       groups of cells -> tasks of K replicas within a memory budget
    worker.py     one task: ``config.assemble`` + ``Trainer``, results back as plain dicts
    executors.py  inline, local process pool, Ray
    runner.py     ``run_sweep(spec, store, SweepOptions)``: add, claim, run, record; the summary
    store.py      the SQLite store (one row per cell, resumable, kill -9 safe)
    schema.py     the store's file: its schema, created or checked when it is opened
    transfer.py   the muTransfer analysis: best LR per width, slope, penalty

All learning rates and seeds of one configuration train together as the K replicas of one batched model;
each replica has its own seeded initialisation and data order, so a cell's numbers do not depend on which
cells it was batched with, nor on the executor, beyond rounding: bitwise for the same batch shapes and thread
count on the same CPU; batched with other cells (another K), or with other threads or another CPU's kernels,
sums may be split and rounded differently, at the rounding level of the cell's dtype (tests/tolerances.py).
The command line is ``mulocal sweep | report | plot`` (``cli/sweeps.py``).
"""
from importlib import import_module

from .plan import plan, replica_bytes  # eager (torch-free): a lazy name 'plan' would meet its module's own name

_WHERE = {"EXECUTORS": "spec", "make_executor": "executors",
          "SweepOptions": "runner", "format_summary": "runner", "run_sweep": "runner", "ALIASES": "spec",
          "LISTS": "spec", "RUN_KEYS": "spec", "expand": "spec", "load_spec_file": "spec", "normalize_spec": "spec",
          "Store": "store", "StoreError": "schema", "run_task": "worker"}


def __getattr__(name: str):
    """The names below, each loaded from its module on first use (the command line's parsers need no torch)."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = sorted([*_WHERE, "plan", "replica_bytes"])
