"""``mulocal reproduce depth``: learning-rate transfer across depth (an experiment of our own, beyond the paper).

BP, PC and DTP train residual MLPs (``--arch resmlp``) of depth H on FashionMNIST under Depth-muP (the width
preset's muP with the branch multiplier a = d^-1/2 and the depth-independent SGD branch LR; docs/depth.md) and
under the depth-free control (a = 1, no depth factor: ``depth_alpha = 0``, ``depth_c = 0``, the "SP" of
depth). Per rule and parameterization, the best learning rate at every depth is estimated as for the width
experiments (``sweep.transfer.analyze(..., axis="depth")``: seed-mean metric, quadratic vertex in log2 LR,
bootstrap over seeds and fit windows) and judged by the verdict rule of docs/REPRODUCTION.md with depth in
place of width: "reproduced" iff the slope of log2(best LR) per doubling of depth is within 0.25 under
Depth-muP and separated from the control's by 2 sigma, by test accuracy and by training loss.

PC runs at its defaults on a residual net: the error solver (``inference=auto``, T = 3) on the energy with
hidden weights gamma_l = d (``Parameterization.gamma_hidden``); its control also drops that depth factor. DTP
runs its muP preset with trained feedback (residual feedback g(t) = t + a (V phi(t) + c)). The report also gives,
per depth, each rule's best test accuracy (PC and DTP against BP at the deepest depths).

PC's activity learning rate: at a fixed weight LR, a sweep of the state solver's step kappa (``ACTIVITY``; sequential
single shot on the depth-free energy) per depth, analysed like a learning-rate sweep (``activity_rows`` relabels
kappa as the swept rate): the best kappa per depth and its slope per doubling of depth.
"""
from __future__ import annotations

from ..errors import ConfigError

DEPTH_FREE = {"depth_alpha": 0.0, "depth_c": 0.0, "depth_gamma": 0.0}  # the control (sweep.verdict.is_depth_free)
ALGOS = ("bp", "pc", "dtp")
BUDGETS = {
    "small": dict(depths=[8, 16, 32, 64], widths=[128], lrs=[2.0 ** k for k in range(-5, 3)], seeds=[0, 1], epochs=1,
                  train_subset=4000, test_subset=2000),
    "paper": dict(depths=[8, 16, 32, 64, 128], widths=[128, 256, 512], lrs=[2.0 ** k for k in range(-7, 4)],
                  seeds=[0, 1, 2], epochs=5, train_subset=None, test_subset=None),
    "tiny": dict(depths=[4, 6], widths=[8], lrs=[0.25, 1.0], seeds=[0, 1], epochs=1, train_subset=300,
                 test_subset=200),
}


# the activity-LR sweep: the state solver's step kappa (sequential single shot, the depth-free energy gamma_l = 1,
# where kappa = 1 = 1/gamma_l propagates the error through every block) on a log2 grid around 1, at this weight LR
STATE_SOLVER = {"inference": "sequential", "T": 1}
ACTIVITY = {"small": dict(kappas=[2.0 ** (k / 4) for k in range(-10, 3)], lr=0.125),
            "paper": dict(kappas=[2.0 ** (k / 4) for k in range(-12, 3)], lr=0.125),
            "tiny": dict(kappas=[0.5, 0.71, 1.0], lr=0.25)}


def _common(budget: str) -> dict:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'; choose small or paper")
    b = dict(BUDGETS[budget])
    return dict(algo=list(ALGOS), param="mup", arch="resmlp", depth=b.pop("depths"), optimizer="sgd",
                dataset="fashion-mnist", batch_size=128, **b)


def specs(budget: str) -> list[dict]:
    """The sweep specs, each under Depth-muP and under the depth-free control (a = 1, no depth factors, PC's
    depth-free energy): every rule at its defaults (PC: the error solver, ``inference=auto`` on a residual net),
    tanh and relu."""
    common = _common(budget)
    relu = dict(common, activation="relu")  # no tanh saturation to hide the control's growth
    return [s for spec in (common, relu) for s in (spec, dict(spec, param_options=dict(DEPTH_FREE)))]


def activity_spec(budget: str) -> dict:
    """PC under Depth-muP at one weight LR and the budget's first width, swept over the inference step kappa."""
    a = ACTIVITY[budget]
    return dict(_common(budget), algo="pc", widths=BUDGETS[budget]["widths"][:1], lrs=[a["lr"]],
                algo_options=dict(STATE_SOLVER, kappa=a["kappas"]), param_options={"depth_gamma": 0.0})


def activity_rows(rows: list[dict]) -> list[dict]:
    """Rows of the activity-LR sweep relabelled for ``sweep.transfer.analyze``: kappa becomes the swept rate
    (``lr``) and leaves the configuration, so one family holds every kappa."""
    out = []
    for r in rows:
        cfg = dict(r["config"])
        opts = dict(cfg.get("algo_options") or {})
        kappa = opts.pop("kappa")
        resolved = {k: v for k, v in (cfg.get("algo_resolved") or {}).items() if k != "kappa"}
        cfg.update(algo_options=opts, algo_resolved=resolved, lr=kappa, weight_lr=r["config"]["lr"])
        out.append(dict(r, lr=kappa, config=cfg))
    return out


def _rule_key(fam: dict) -> str:
    opts = fam.get("algo_options") or {}
    return (fam["algo"] + (f" kappa={opts['kappa']:g}" if "kappa" in opts else "")
            + (f" {fam['activation']}" if fam.get("activation", "tanh") != "tanh" else ""))


def _activity(budget, store, how: dict, say) -> dict:
    """The activity-LR sweep and its analysis along depth (best kappa per depth, slope, by both metrics)."""
    from ..sweep.transfer import analyze
    from .grids import best_per_value, run_and_read
    spec = activity_spec(budget)
    rows = activity_rows(run_and_read(spec, store, how))
    out = {"weight_lr": spec["lrs"][0], "kappas": spec["algo_options"]["kappa"], "store": str(store)}
    for m in ("train_loss", "test_accuracy"):
        fams = analyze(rows, metric=m, axis="depth")["families"]
        if len(fams) != 1:
            raise ConfigError(f"the activity-LR sweep should form one family, got {len(fams)}")
        f = fams[0]
        best_kappa, at_edge = best_per_value(f)
        out[m] = {"best_kappa": best_kappa, "at_edge": at_edge, "slope": f["transfer"]["slope"],
                  "slope_err": f["transfer"]["slope_err"]}
        t = out[m]
        say(f"PC activity LR (kappa) by {m}: best per depth "
            + ", ".join(f"H={H}: {k:.3g}" if k else f"H={H}: -" for H, k in t["best_kappa"].items())
            + (f"; slope {t['slope']:+.2f} +- {t['slope_err'] or 0:.2f} per doubling of depth"
               if t["slope"] is not None else ""))
    return out


def run_depth(budget: str, out, how: dict, say) -> dict:
    """``mulocal reproduce depth`` (``how``: the sweeps' run options: device, data_dir, workers, compile, and cell
    fields set in every sweep under "cells", ``grids.run_and_read``)."""
    from ..plots import transfer_figure
    from ..sweep.table import format_table
    from ..sweep.transfer import analyze
    from ..sweep.verdict import is_depth_free, verdicts
    from .grids import family_entry, say_verdicts, sweep_until_bracketed

    store = out / "results.sqlite"
    rows, final, notes = sweep_until_bracketed(specs(budget), store, how, say)
    reports = {m: analyze(rows, metric=m, axis="depth") for m in ("train_loss", "test_accuracy")}
    b = BUDGETS[budget]
    title = ("Depth transfer: residual MLPs, BP / PC / DTP under Depth-muP (a = d^-1/2) vs the depth-free control "
             f"(a = 1)\n({budget} budget: {b['train_subset'] or 'all'} training samples, {b['epochs']} epoch(s), "
             f"{len(b['seeds'])} seeds, width {b['widths']}, depths {b['depths']})")
    fig = transfer_figure(reports["train_loss"], out / "depth.png", title, other=reports["test_accuracy"])
    say(format_table(reports["train_loss"], reports["test_accuracy"]))
    acc_t = {f["label"]: f["transfer"] for f in reports["test_accuracy"]["families"]}
    fams = [dict(family_entry(f, acc_t), control=is_depth_free(f["family"])) for f in reports["train_loss"]["families"]]
    pairs = verdicts(reports["test_accuracy"], reports["train_loss"])  # each family against its depth-free control
    say_verdicts(pairs, say)
    gaps = _accuracy_minus_bp(fams)
    for key, per_width in gaps.items():
        for W, g in per_width.items():
            say(f"{key} (width {W}) best test accuracy minus BP's (Depth-muP), per depth: "
                + ", ".join(f"H={H}: {v:+.3f}" if v is not None else f"H={H}: -" for H, v in g.items()))
    activity = _activity(budget, out / "activity.sqlite", how, say)
    return {"activity_lr": activity, "title": title, "store": str(store), "figure": fig, "families": fams,
            "verdicts": pairs, "accuracy_minus_bp": gaps, "grid_notes": notes, "lrs": [s["lrs"] for s in final],
            "report_command": f"mulocal report --store {store} --axis depth"}


def _accuracy_minus_bp(fams: list[dict]) -> dict:
    """Per local rule (with its options and activation), per width, per depth: its best test accuracy minus BP's
    (same activation and width), Depth-muP families only."""
    best = {(_rule_key(f["family"]), f["family"]["width"]): f["best_test_accuracy"] for f in fams if not f["control"]}
    gaps: dict = {}
    for (key, W), acc in best.items():
        ref = best.get(("bp" + (" relu" if key.endswith(" relu") else ""), W))
        if key.startswith("bp") or ref is None:
            continue
        gaps.setdefault(key, {})[str(W)] = {H: (None if a is None or ref.get(H) is None else a - ref[H])
                                            for H, a in acc.items()}
    return gaps
