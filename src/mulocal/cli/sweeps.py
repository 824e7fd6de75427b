"""Sweep commands: ``sweep``, ``report``, ``plot``, and the experiments built on sweeps: ``reproduce``, ``demo``.

The sweep's axes are the run fields (``config.FIELDS``) and the learning rules' options, generated as
comma-separated list flags (``flags.py``): ``mulocal sweep --algo bp,pc --T 1,4 --widths 64,128 --lrs ...``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..config import DTYPES, FIELDS, config_hash
from ..errors import ConfigError, check_choice
from ..sweep.spec import ALIASES, EXECUTORS, LISTS, RUN_KEYS  # the parsers' names: no torch (the rest on use)
from .flags import add_algo_options, add_compile_flag, add_fields, list_of, scoped_algo_options, split_items
from .paths import checked_dir, out_dir, out_file


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
    if not vals.strip():
        raise argparse.ArgumentTypeError(f"option {key} has no value")
    values = [_parse_value(v) for v in split_items(vals)]
    return (scope or None), key, values




def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default=None, help="a TOML file with a [sweep] table (and optionally a [run] table)")
    p.add_argument("--store", type=out_file, default=None, help="the SQLite store to add the cells to and resume from")
    a = p.add_argument_group("axes (comma-separated values are swept; they override the spec file)")
    a.add_argument("--widths", dest="ax_widths", type=list_of("int"), default=None, metavar="W[,W...]",
                   help="widths, e.g. 64,128,256")
    a.add_argument("--lrs", "--lr", dest="ax_lrs", type=list_of("lr"), default=None, metavar="LR[,LR...]",
                   help="base learning rates")
    a.add_argument("--log2-lrs", dest="log2_lrs", type=_log2_range, default=None, metavar="START:STOP[:STEP]",
                   help="learning rates 2^START..2^STOP, e.g. --log2-lrs=-6:2 or --log2-lrs=-6:2:0.5 (write the '=' "
                        "when START is negative); instead of --lrs")
    a.add_argument("--seeds", dest="ax_seeds", type=list_of("int0"), default=None, metavar="S[,S...]",
                   help="seeds (default 0)")
    a.add_argument("--algo-opt", dest="algo_opt", type=_option, action="append", default=[],
                   metavar="[ALGO.]KEY=V[,V...]", help="an option of the learning rule, e.g. pc.T=1,4 (repeatable)")
    a.add_argument("--param-opt", dest="param_opt", type=_option, action="append", default=[],
                   metavar="KEY=V[,V...]", help="a parameterization field override, e.g. gamma_L_prime=1,2")
    add_fields(p, lists=True, run_flags=False)
    add_algo_options(p, lists=True)
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
    add_compile_flag(r, default=None, where="each task's training step")
    r.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    r.add_argument("--no-download", action="store_true", help="never try to download data")
    r.add_argument("--reset-running", action="store_true",
                   help="also take over cells marked running by another (crashed) sweep process")
    r.add_argument("--dry-run", action="store_true", help="only add the cells and show the plan")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")




def spec_from_args(args) -> tuple[dict, dict]:
    """The sweep spec and run options from parsed ``mulocal sweep`` arguments (file first, flags override)."""
    from ..sweep import load_spec_file
    spec, run = ({}, {}) if not args.spec else load_spec_file(args.spec)
    spec = {ALIASES.get(str(k).replace("-", "_"), str(k).replace("-", "_")): v for k, v in spec.items()}
    for key in list(LISTS) + list(FIELDS):
        v = getattr(args, "ax_" + key, None)
        if v is not None:
            spec[key] = v
    if args.log2_lrs is not None:
        if args.ax_lrs is not None:
            raise ConfigError("give --lrs or --log2-lrs, not both")
        spec["lrs"] = args.log2_lrs
    declared = scoped_algo_options(args, spec.get("algo") if isinstance(spec.get("algo"), list) else
                                   [spec.get("algo", FIELDS["algo"].default)])
    if declared:
        opts = dict(spec.get("algo_options") or {})
        for scope, values in declared.items():
            opts[scope] = {**(opts.get(scope) or {}), **values}
        spec["algo_options"] = opts
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
    from ..sweep import Store, expand, format_summary, run_sweep
    spec, run = spec_from_args(args)
    store = run.get("store")
    if not store:
        raise ConfigError("give the store: --store PATH (a SQLite file; created if missing)")
    run = {k: v for k, v in run.items() if k != "store"}
    summary = run_sweep(spec, store, download=not args.no_download, progress=not args.no_progress,
                        reset_running=args.reset_running, dry_run=args.dry_run, **run)
    if not args.json:
        print(format_summary(summary))
        if summary.get("complete"):  # by training loss and by test accuracy (the paper's metric), as report does
            from ..sweep.table import format_table
            from ..sweep.transfer import analyze
            with Store(store, create=False) as st:
                rows = st.rows(hashes=[config_hash(c) for c in expand(spec)])
            rep, by_acc = analyze(rows), analyze(rows, metric="test_accuracy")
            if rep["families"]:
                print()
                print(format_table(rep, by_acc))
    return summary, (1 if summary.get("failed") else 0)  # failed (an error in a worker) is not diverged


def _report_from_args(args) -> tuple[dict, dict]:
    """The report of the store by ``--metric``, and the report by the other metric."""
    from ..sweep import Store
    from ..sweep.table import best_accuracy, learns
    from ..sweep.transfer import analyze
    from ..sweep.verdict import verdicts
    with Store(args.store, create=False, readonly=True) as st:
        rows = st.rows()
        rep = analyze(rows, metric=args.metric, axis=args.axis)
        for f in rep["families"]:
            f["best_test_accuracy"] = {str(w): a for w, a in best_accuracy(f).items()}
            f["learns"] = learns(f, args.learn_floor)
        # the other metric: the paper plots test accuracy, the estimator defaults to training loss
        other = analyze(rows, metric="test_accuracy" if args.metric != "test_accuracy" else "train_loss",
                        axis=args.axis)
        rep["other_metric"] = {"metric": other["metric"],
                               "families": [{"label": f["label"], "transfer": f["transfer"]}
                                            for f in other["families"]]}
        rep["verdicts"] = verdicts(rep, other)
        results = st.results()
        if results:
            rep["results"] = results
        if getattr(args, "csv", None):
            rep["csv"] = str(args.csv)
            rep["csv_rows"] = st.export_csv(args.csv)
    rep["store"] = str(args.store)
    return rep, other


def cmd_report(args) -> dict:
    from ..sweep.table import format_table
    rep, other = _report_from_args(args)
    if not args.json:
        if rep["families"] or not rep.get("results"):
            print(format_table(rep, other, args.learn_floor))
        for name, res in rep.get("results", {}).items():
            print(f"{name}: " + json.dumps(res.get("summary", res), indent=1))
        if rep.get("csv"):
            print(f"csv: {rep['csv']} ({rep['csv_rows']} rows)")
    return rep


def cmd_plot(args) -> dict:
    from ..plots import plot_report
    rep, other = _report_from_args(args)
    out = args.out or checked_dir(str(Path(args.store).with_suffix("")) + "_plots")
    paths = plot_report(rep, out, other)
    if not args.json:
        for p in paths:
            print(p)
    return {"store": str(args.store), "out": str(out), "plots": paths, "metric": rep["metric"]}



def register(subparsers) -> None:
    """Add ``sweep``, ``report``, ``plot``, ``reproduce`` and ``demo`` to an argparse subparsers object, their flags
    at once (``mulocal``'s own parser adds them on first use)."""
    from . import COMMANDS
    for name, (module, text) in COMMANDS.items():
        if module == "sweeps":
            globals()["add_" + name](subparsers.add_parser(name, help=text))


def add_sweep(s: argparse.ArgumentParser) -> None:
    s.description = ("Run every cell of a sweep not yet finished in the store. Learning rates and seeds of one "
                     "configuration train as replicas of one batched model.")
    _add_sweep_args(s)
    s.set_defaults(func=cmd_sweep)


def add_report(r: argparse.ArgumentParser) -> None:
    from ..sweep.transfer import METRICS
    r.add_argument("--store", required=True, help="the sweep's SQLite store")
    r.add_argument("--axis", default="width", choices=("width", "depth"),
                   help="the transfer axis: width (default) or depth (families then differ in all but depth)")
    r.add_argument("--metric", default="train_loss", choices=METRICS,
                   help="what picks the best LR (default train_loss, averaged over seeds)")
    r.add_argument("--csv", type=out_file, default=None, help="also export every cell to this CSV file")
    r.add_argument("--learn-floor", type=float, default=0.5,
                   help="flag a family whose best test accuracy stays below this at every width (default 0.5)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_report)


def add_plot(p: argparse.ArgumentParser) -> None:
    from ..sweep.transfer import METRICS
    p.add_argument("--store", required=True, help="the sweep's SQLite store")
    p.add_argument("--out", type=out_dir, default=None, help="folder for the PNGs (default: next to the store)")
    p.add_argument("--axis", default="width", choices=("width", "depth"),
                   help="the transfer axis: width (default) or depth (families then differ in all but depth)")
    p.add_argument("--metric", default="train_loss", choices=METRICS,
                   help="what picks the best LR marked on the left panels (default train_loss)")
    p.add_argument("--learn-floor", type=float, default=0.5, help="see report")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plot)


REPRODUCE_OUT = "runs/reproduce"


def add_reproduce(m: argparse.ArgumentParser) -> None:
    from ..experiments.reproduce import NAMES

    def experiment(text: str) -> str:
        return check_choice("experiment", text, NAMES, also=("all",), error=argparse.ArgumentTypeError)
    m.add_argument("name", type=experiment, metavar="NAME",
                   help=f"the experiment: {', '.join(NAMES)}, or all of them: all")
    m.add_argument("--budget", default="small", help="small (2-6 min each on 2 CPU cores, the CNN about 30) or paper (GPU)")
    m.add_argument("--out", type=out_dir, default=None,
                   help=f"folder for results, stores and figures (default {REPRODUCE_OUT})")
    m.add_argument("--device", default=None, help="cpu (default) or cuda, for the transfer experiments")
    m.add_argument("--data-dir", default=None, help="folder with the datasets' files")
    m.add_argument("--workers", type=int, default=None, help="sweep processes (default one per core)")
    add_compile_flag(m, where="the sweeps' training steps")
    m.add_argument("--dtype", default=None, choices=DTYPES,
                   help="the training runs' dtype instead of float32 (tf32: TensorFloat-32 products on a GPU); "
                        "cells of their own in the store (the float64 analyses ignore it in 'all')")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=cmd_reproduce)


def add_demo(d: argparse.ArgumentParser) -> None:
    d.add_argument("--out", type=out_dir, default=None, help="folder for the plot and results")
    d.add_argument("--quick", action="store_true", help="a smaller, faster version")
    d.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_demo)


def cmd_reproduce(args) -> dict:
    from ..experiments.reproduce import run, run_all
    out = args.out or checked_dir(REPRODUCE_OUT, create=False)  # made by the experiment once its checks pass
    if args.name == "all":
        return run_all(args.budget, out, args.device or "cpu", args.data_dir, args.workers, json_mode=args.json,
                       compile=args.compile, dtype=args.dtype)
    return run(args.name, args.budget, out, args.device, args.data_dir, args.workers, json_mode=args.json,
               compile=args.compile, dtype=args.dtype)


def cmd_demo(args) -> dict:
    from ..experiments.demo import run_demo
    out = args.out or checked_dir("runs/demo-quick" if args.quick else "runs/demo")  # the quick demo: its own store
    return run_demo(out_dir=out, quick=args.quick, data_dir=args.data_dir, json_mode=args.json)


__all__ = ["add_demo", "add_plot", "add_report", "add_reproduce", "add_sweep", "cmd_demo", "cmd_plot", "cmd_report",
           "cmd_reproduce", "cmd_sweep", "register", "spec_from_args"]
