"""The README's main job: learning-rate transfer across widths on real FashionMNIST.

A sweep (``mulocal.sweep``) over every learning rule the library has among BP, PC and DTP, muP
against SP (SGD), widths 64-512, a log2 grid of learning rates and two seeds, one epoch on a
training subset. All learning rates and seeds of one width and configuration train as the
replicas of one batched model. Results go to ``OUT/demo.sqlite``: running the demo again only
runs what is missing, and ``mulocal report --store OUT/demo.sqlite`` prints the same numbers.

The best learning rate per width is the vertex of a quadratic fitted in log2(LR) to the
seed-averaged training loss (``mulocal.sweep.transfer``). Under muP it stays put as the width grows
(slope of log2(best LR) against log2(width) near 0, small penalty for reusing the width-64
optimum at width 512); under SP it moves.

As in ``reproduce``, wherever a configuration's best LR (by training loss or test accuracy) sits on an end
of the grid, that rule's grid is extended by two points at that end and the new cells are trained
(``grids.sweep_until_bracketed``, at most ``grids.MAX_EXTEND`` rounds), so no optimum is reported on a
grid edge unless the extension limit was hit.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from ..util import json_safe

LR_GRID = [2.0 ** k for k in range(-6, 3)]
DEMO = dict(widths=[64, 128, 256, 512], lrs=LR_GRID, seeds=[0, 1], epochs=1, train_subset=30000,
            test_subset=5000)
QUICK = dict(widths=[64, 128, 256, 512], lrs=[2.0 ** k for k in range(-5, 2)], seeds=[0, 1], epochs=1,
             train_subset=4000, test_subset=2000)
RULES = ("bp", "pc", "dtp")  # the ones make_algo knows are used


def demo_spec(quick: bool = False) -> dict:
    """The demo's sweep spec (a plain dict: ``mulocal sweep`` takes the same keys in a TOML [sweep] table)."""
    from ..algos import ALGOS
    base = QUICK if quick else DEMO
    return dict(algo=[a for a in RULES if a in ALGOS], param=["mup", "sp"], optimizer="sgd", base_width=64,
                arch="mlp", depth=3, activation="tanh", dataset="fashion-mnist", batch_size=128, **base)


def run_demo(out_dir: str = "runs/demo", quick: bool = False, data_dir=None, json_mode: bool = False,
             seed: int = 0, workers: int | None = None) -> dict:
    """Run (or resume) the demo sweep, write the plots, print the table; return the summary.

    ``seed`` shifts the two seeds used; ``workers`` is passed to the sweep (default one process per core,
    0 = in this process).
    """
    from ..sweep.table import format_table
    from ..sweep.transfer import analyze
    from ..sweep.verdict import verdicts
    from ..plots import plot_report
    from ..sweep import format_summary, run_sweep
    from .grids import sweep_until_bracketed

    spec = demo_spec(quick)
    spec["seeds"] = [seed + s for s in spec["seeds"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "demo.sqlite"
    say = (lambda *a: print(*a, file=sys.stderr)) if json_mode else print
    say(f"muTransfer demo{' (quick)' if quick else ''}: FashionMNIST ({spec['train_subset']} training samples, "
        f"{spec['epochs']} epoch), 3-layer tanh MLP, {'/'.join(a.upper() for a in spec['algo'])} x muP/SP with SGD, "
        f"widths {spec['widths']}, {len(spec['lrs'])} learning rates x {len(spec['seeds'])} seeds as replicas")
    t0 = time.perf_counter()
    label = "demo" + (" --quick" if quick else "")
    summary = run_sweep(spec, store, workers=workers, data_dir=data_dir, progress=True, label=label)
    say(format_summary(summary))
    # then per rule (its muP and SP share a grid, as in reproduce): extend the grid where an optimum sits on an
    # end; the cells above are finished, only the extension's are trained
    rows, final, notes = sweep_until_bracketed([dict(spec, algo=a) for a in spec["algo"]], store,
                                               dict(workers=workers, data_dir=data_dir, label=label), say)
    extended = {s["algo"]: s["lrs"] for s in final if len(s["lrs"]) > len(spec["lrs"])}
    report, by_acc = analyze(rows), analyze(rows, metric="test_accuracy")  # both metrics: the paper's is accuracy
    plots = plot_report(report, out, by_acc)
    table = format_table(report, by_acc)
    say("")
    say(table)
    verdict = _verdict(report, by_acc)
    if verdict:
        say("")
        say(verdict)
    say(f"\nplots: {', '.join(plots)}\nstore: {store}  (mulocal report --store {store})")
    acc_t = {f["label"]: f["transfer"] for f in by_acc["families"]}
    result = {"out": str(out), "store": str(store), "plots": plots, "spec": spec, "sweep": summary,
              "seconds": time.perf_counter() - t0, "verdict": verdict, "grid_notes": notes, "extended_lrs": extended,
              "results": [{"label": f["label"], "algo": f["family"]["algo"], "param": f["family"]["param"],
                           "best_lr": {str(e["width"]): e["best_lr"] for e in f["best"]},
                           "log2_std": {str(e["width"]): e["log2_std"] for e in f["best"]},
                           "slope": f["transfer"]["slope"], "slope_err": f["transfer"]["slope_err"],
                           "penalty": f["transfer"]["penalty"],
                           "test_accuracy": {k: acc_t.get(f["label"], {}).get(k)
                                             for k in ("slope", "slope_err", "penalty")}}
                          for f in report["families"]],
              "verdicts": verdicts(by_acc, report)}
    (out / "demo.json").write_text(json.dumps(json_safe(result), indent=1))
    return result


def _verdict(report: dict, by_acc: dict) -> str:
    """One line per rule: the drift of the best LR under muP and SP by training loss and by test accuracy."""
    lines = []
    acc = {(f["family"]["algo"], f["family"]["param"]): f["transfer"] for f in by_acc["families"]}
    by = {(f["family"]["algo"], f["family"]["param"]): f["transfer"] for f in report["families"]}
    for algo in dict.fromkeys(f["family"]["algo"] for f in report["families"]):
        mup, sp = by.get((algo, "mup")), by.get((algo, "sp"))
        if not mup or not sp or mup["slope"] is None or sp["slope"] is None:
            continue
        line = (f"{algo.upper()}: the best LR moves {mup['slope']:+.2f} octaves per doubling of width under muP, "
                f"{sp['slope']:+.2f} under SP (training loss)")
        am, asp = acc.get((algo, "mup")), acc.get((algo, "sp"))
        if am and asp and am["slope"] is not None and asp["slope"] is not None:
            line += f"; {am['slope']:+.2f} vs {asp['slope']:+.2f} by test accuracy"
        lines.append(line)
    return "\n".join(lines)
