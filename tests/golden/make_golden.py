"""Writes the golden files the redesign guard rails check (tests/test_golden.py).

Run once, with the code *before* a restructuring, then commit what it writes:

    python tests/golden/make_golden.py

* ``store.sqlite`` + ``store_spec.json``: a small finished sweep store (BP, PC with two T, DTP with ridge
  feedback and a parameterization override, muP and SP); later code must find every cell of the spec
  already there (same cell hashes) and rerun nothing.
* ``cli.json``: the JSON printed by a fixed set of commands; later code must print the same.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

STORE_SPEC = dict(algo=["bp", "pc", "dtp"], param=["mup", "sp"], widths=[8, 16], lrs=[0.05, 0.2], seeds=[0, 1],
                  dataset="synthetic", train_subset=256, test_subset=128, epochs=1, batch_size=64, dtype="float64",
                  algo_options={"pc": {"T": [1, 2]}, "dtp": {"feedback": ["ridge"]}},
                  param_options={"gamma_L_prime": [1.0]})

TRAIN = ["--dataset", "synthetic", "--width", "16", "--epochs", "1", "--dtype", "float64", "--no-progress", "--json"]
COMMANDS = [
    ["describe", "--param", "mup", "--optimizer", "adam", "--width", "1024", "--json"],
    ["describe", "--param", "mup", "--algo", "dtp", "--width", "256", "--json"],
    ["train", *TRAIN],
    ["train", *TRAIN, "--algo", "pc", "--T", "2", "--gamma-bar-L", "1", "--lr", "0.1,0.2", "--seeds", "0,1"],
    ["train", *TRAIN, "--algo", "dtp", "--feedback", "ridge", "--optimizer", "adam"],
    ["train", *TRAIN, "--algo", "tp", "--fb-loss", "drl", "--sigma", "0.05"],
    ["coord", "--dataset", "synthetic", "--widths", "16,32", "--steps", "2", "--replicas", "2", "--dtype", "float64",
     "--json"],
    ["coord", "--dataset", "synthetic", "--widths", "16,32", "--steps", "2", "--replicas", "2", "--dtype", "float64",
     "--algo", "pc", "--gamma-bar-L", "-1", "--json"],
    ["sweep", "--dataset", "synthetic", "--widths", "8,16", "--lrs", "0.1,0.2", "--algo", "bp,pc", "--param", "mup,sp",
     "--algo-opt", "pc.T=1,2", "--dry-run", "--store", "{tmp}/dry.sqlite", "--json"],
    ["report", "--store", "{tmp}/store.sqlite", "--json"],
    ["report", "--store", "{tmp}/store.sqlite", "--metric", "test_accuracy", "--json"],
]
# keys whose values depend on the machine, the clock or the folder
VOLATILE = {"seconds", "run_seconds", "cells_per_minute", "epoch_time", "store", "plot", "out", "csv", "host",
            "created", "started", "finished", "version"}


def run_cli(argv: list[str], tmp: Path) -> dict:
    import torch

    from mulocal.cli import main
    torch.set_num_threads(1)
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"{argv}: exit {rc}")
    return json.loads(buf.getvalue())


def make_store(path: Path) -> None:
    from mulocal.sweep import run_sweep
    summary = run_sweep(STORE_SPEC, path, workers=0, threads=1, progress=False)
    assert summary["complete"], summary


def main() -> None:
    import tempfile
    store = HERE / "store.sqlite"
    if store.exists():
        store.unlink()
    make_store(store)
    (HERE / "store_spec.json").write_text(json.dumps(STORE_SPEC, indent=1) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(store, Path(tmp) / "store.sqlite")
        out = [{"argv": argv, "json": run_cli(argv, Path(tmp))} for argv in COMMANDS]
    (HERE / "cli.json").write_text(json.dumps(out, indent=1, allow_nan=True) + "\n")
    print(f"wrote {store.name}, store_spec.json, cli.json in {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
