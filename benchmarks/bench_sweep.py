"""Benchmark: sweep throughput (cells per minute) of three ways to run the same sweep.

The sweep: BP + SGD under muP, a 3-layer tanh MLP, 4 widths (64, 128, 256, 512) x 8 learning
rates (2^-6 .. 2^1), one seed, one epoch on a FashionMNIST training subset (``--train-subset``,
default 4000 samples; 1000 test samples for the end-of-epoch evaluation) = 32 cells. Each way
runs it into a fresh store, timed end to end with ``time.perf_counter`` (spec expansion, data
loading, process start-up, training, evaluation and the SQLite writes all count):

1. ``one-at-a-time``: in this process, one cell per model (``--workers 0 --max-replicas 1``);
2. ``batched``: in this process, the 8 learning rates of a width as 8 replicas of one model
   (``--workers 0``): 4 tasks;
3. ``pool``: the batched tasks on the local process pool (``--executor local``, one worker
   per core, ``cores // workers`` torch threads each).

In-process runs use PyTorch's default number of threads (printed). The pool splits the costliest
tasks (the widest model's replicas) so that its workers get similar shares. As a check, the
largest difference of a cell's training loss between the ways is reported, near each width's
optimum (it should be at float32 rounding level: a cell's numbers do not depend on how it was
run) and over all cells (large learning rates train chaotically and amplify the rounding
differences that multi-threaded matmuls of different replica counts make).

Every cell runs on ``--device`` (default cpu; ``cuda``: the sweep's device option, as ``mulocal sweep --device``);
a device that is not available here stops the script with one line on stderr (status 2).

If FashionMNIST cannot be loaded, or with ``--dataset synthetic``, the synthetic teacher task is
used instead (and the output says so).

Run (about 1 minute on 2 CPU cores when the machine is otherwise idle):

    python benchmarks/bench_sweep.py
    python benchmarks/bench_sweep.py --train-subset 2000 --widths 64,128
    python benchmarks/bench_sweep.py --json          # one JSON object on stdout instead of the table
    python benchmarks/bench_sweep.py --device cuda --modes one-at-a-time,batched   # on the GPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import add_device_arg, mulocal, resolve_device
from mulocal.errors import MulocalError
from mulocal.sweep.store import Store
from mulocal.sweep import run_sweep

MODES = {
    "one-at-a-time": dict(workers=0, max_replicas=1),
    "batched": dict(workers=0),
    "pool": dict(executor="local", workers=None),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="64,128,256,512")
    p.add_argument("--n-lrs", type=int, default=8, help="learning rates 2^-6, 2^-5, ... (default 8)")
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or synthetic")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_arg(p)
    args, unknown = p.parse_known_args(argv)
    args.device = resolve_device(args.device, "bench_sweep")
    if unknown:  # ./run.sh bench passes the same arguments to every benchmark
        print(f"bench_sweep: ignoring arguments {' '.join(unknown)}", file=sys.stderr)
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    modes = [m for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    dataset, note = args.dataset, ""
    if dataset != "synthetic":
        try:
            from mulocal.data import load_dataset
            load_dataset(dataset, train_subset=args.train_subset, test_subset=args.test_subset, download=False)
        except MulocalError as e:
            dataset, note = "synthetic", f"{args.dataset} not available ({e}); using the synthetic task instead"
    spec = dict(algo="bp", param="mup", optimizer="sgd", widths=widths,
                lrs=[2.0 ** (k - 6) for k in range(args.n_lrs)], seeds=[0], epochs=1, dataset=dataset,
                train_subset=args.train_subset if dataset != "synthetic" else min(args.train_subset, 2048),
                test_subset=args.test_subset if dataset != "synthetic" else min(args.test_subset, 512))
    n_cells = len(widths) * args.n_lrs
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if note:
        say(note)
    say(f"sweep: BP muP SGD, widths {widths} x {args.n_lrs} learning rates = {n_cells} cells, {dataset} "
        f"({spec['train_subset']} training samples, 1 epoch); {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {args.device}")
    results, losses = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            store = Path(tmp) / f"{mode}.sqlite"
            t0 = time.perf_counter()
            s = run_sweep(spec, store, progress=False, device=args.device, **MODES[mode])
            wall = time.perf_counter() - t0
            if s["failed"]:
                raise SystemExit(f"bench_sweep: {mode}: {s['failed']} cells failed: {s['errors']}")
            with Store(store, create=False) as st:
                rows = st.rows()
                losses[mode] = {r["hash"]: r["train_loss"] for r in rows}
                widths_of = {r["hash"]: r["width"] for r in rows}
            results[mode] = {"seconds": wall, "cells": s["ran"], "tasks": s["tasks"], "workers": s["workers"],
                             "cells_per_minute": 60.0 * s["ran"] / wall}
            say(f"  {mode:<14} {wall:7.1f} s  {results[mode]['cells_per_minute']:7.1f} cells/min  "
                f"({s['tasks']} tasks, {s['workers']} at a time)")
    ref = modes[0]
    # the largest difference over all cells, and over the cells near each width's optimum (loss within 1.5x of
    # the width's best): past the optimum, training is chaotic and amplifies float32 rounding differences
    # (multi-threaded matmuls split their sums differently for different replica counts)
    best: dict = {}
    for h, v in losses[ref].items():
        if v is not None and math.isfinite(v):
            best[widths_of[h]] = min(best.get(widths_of[h], math.inf), v)
    diff = diff_stable = 0.0
    for m in modes[1:]:
        for h, v in losses[ref].items():
            u = losses[m][h]
            if v is not None and u is not None and math.isfinite(v) and math.isfinite(u):
                diff = max(diff, abs(v - u))
                if v <= 1.5 * best[widths_of[h]]:
                    diff_stable = max(diff_stable, abs(v - u))
    base = results[ref]["cells_per_minute"]
    say("\nway of running     cells/min   speed-up vs " + ref)
    for m in modes:
        say(f"{m:<18} {results[m]['cells_per_minute']:9.1f}   {results[m]['cells_per_minute'] / base:8.2f}x")
    say(f"largest train-loss difference between the ways: {diff_stable:.2e} near the optima (loss <= 1.5x the "
        f"width's best), {diff:.2e} over all cells (large learning rates amplify float32 rounding)")
    if args.json:
        print(json.dumps({"benchmark": "sweep", "dataset": dataset, "widths": widths, "n_lrs": args.n_lrs,
                          "train_subset": spec["train_subset"], "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
                          "mulocal": mulocal.__version__, "modes": results, "max_train_loss_diff": diff,
                          "max_train_loss_diff_near_optimum": diff_stable,
                          "note": note or None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
