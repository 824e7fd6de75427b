"""``mulocal reproduce depth``: learning-rate transfer across depth (an experiment of our own, beyond the paper).

BP, PC and DTP train residual MLPs (``--arch resmlp``) of depth H on FashionMNIST under Depth-muP (the width
preset's muP with the branch multiplier a = d^-1/2 and the depth-independent SGD branch LR; docs/depth.md) and
under the depth-free control (a = 1, no depth factor: ``depth_alpha = 0``, ``depth_c = 0``, the "SP" of
depth). Per rule and parameterization, the best learning rate at every depth is estimated as for the width
experiments (``sweep.transfer.analyze(..., axis="depth")``: seed-mean metric, quadratic vertex in log2 LR,
bootstrap over seeds and fit windows) and judged by the verdict rule of docs/REPRODUCTION.md with depth in
place of width: "reproduced" iff the slope of log2(best LR) per doubling of depth is within 0.25 under
Depth-muP and separated from the control's by 2 sigma, by test accuracy and by training loss.

PC runs the paper's main setting (sequential single-shot inference, T = 1, no FPA, the default step); DTP its
muP preset with trained feedback (residual feedback g(t) = t + a (V phi(t) + c)). The report also gives, per
depth, each rule's best test accuracy (PC and DTP against BP at the deepest depths).
"""
from __future__ import annotations

from ..errors import ConfigError

DEPTH_FREE = {"depth_alpha": 0.0, "depth_c": 0.0}
ALGOS = ("bp", "pc", "dtp")
BUDGETS = {
    "small": dict(depths=[8, 16, 32, 64], widths=[128], lrs=[2.0 ** k for k in range(-5, 3)], seeds=[0, 1], epochs=1,
                  train_subset=4000, test_subset=2000),
    "paper": dict(depths=[8, 16, 32, 64, 128], widths=[128, 256, 512], lrs=[2.0 ** k for k in range(-7, 4)],
                  seeds=[0, 1, 2], epochs=5, train_subset=None, test_subset=None),
    "tiny": dict(depths=[4, 6], widths=[8], lrs=[0.25, 1.0], seeds=[0, 1], epochs=1, train_subset=300,
                 test_subset=200),
}


def specs(budget: str) -> list[dict]:
    """The sweep specs: every rule under Depth-muP, then under the depth-free control."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'; choose small or paper")
    b = dict(BUDGETS[budget])
    common = dict(algo=list(ALGOS), param="mup", arch="resmlp", depth=b.pop("depths"), optimizer="sgd",
                  dataset="fashion-mnist", batch_size=128, **b)
    return [dict(common), dict(common, param_options=dict(DEPTH_FREE))]


def is_control(fam: dict) -> bool:
    opts = fam.get("param_options") or {}
    return opts.get("depth_alpha") == 0.0 and opts.get("depth_c") == 0.0


def pairs(report: dict, other: dict) -> list[dict]:
    """Each Depth-muP family paired with its depth-free control (same rule, options and width), judged by
    ``sweep.transfer.verdict`` by both metrics."""
    from ..config import canonical_json
    from ..sweep.transfer import verdict

    def key(fam):
        return canonical_json({k: v for k, v in fam.items() if k not in ("param_options", "param_resolved")})
    others = {f["label"]: f["transfer"] for f in other["families"]}
    controls = {key(f["family"]): f for f in report["families"] if is_control(f["family"])}
    out = []
    for f in report["families"]:
        c = controls.get(key(f["family"]))
        if is_control(f["family"]) or c is None:
            continue
        out.append({"label": f["label"], "control": c["label"],
                    report["metric"]: verdict(f["transfer"], c["transfer"]),
                    other["metric"]: verdict(others.get(f["label"]), others.get(c["label"]))})
    return out


def run_depth(budget: str, out, device, data_dir, workers, say) -> dict:
    from ..plots import transfer_figure
    from ..sweep.transfer import analyze, best_accuracy, format_table
    from .reproduce import _summary, _sweep_until_bracketed

    store = out / "results.sqlite"
    rows, final, notes = _sweep_until_bracketed(specs(budget), store, device, data_dir, workers, say)
    reports = {m: analyze(rows, metric=m, axis="depth") for m in ("train_loss", "test_accuracy")}
    b = BUDGETS[budget]
    title = ("Depth transfer: residual MLPs, BP / PC / DTP under Depth-muP (a = d^-1/2) vs the depth-free control "
             f"(a = 1)\n({budget} budget: {b['train_subset'] or 'all'} training samples, {b['epochs']} epoch(s), "
             f"{len(b['seeds'])} seeds, width {b['widths']}, depths {b['depths']})")
    fig = transfer_figure(reports["train_loss"], out / "depth.png", title, other=reports["test_accuracy"])
    say(format_table(reports["train_loss"], reports["test_accuracy"]))
    acc_t = {f["label"]: f["transfer"] for f in reports["test_accuracy"]["families"]}
    fams = [{"label": f["label"], "family": f["family"], "control": is_control(f["family"]),
             "best_lr": {str(e["width"]): e["best_lr"] for e in f["best"]},
             "train_loss": _summary(f["transfer"]), "test_accuracy": _summary(acc_t.get(f["label"])),
             "best_test_accuracy": {str(H): a for H, a in best_accuracy(f).items()}}
            for f in reports["train_loss"]["families"]]
    verdicts = pairs(reports["test_accuracy"], reports["train_loss"])
    for v in verdicts:
        say(f"verdict {v['label']} vs {v['control']}: by test accuracy {v['test_accuracy']['verdict']}, "
            f"by training loss {v['train_loss']['verdict']}")
    gaps = {}  # best test accuracy of each local rule minus BP's, per depth (Depth-muP)
    best = {f["family"]["algo"]: f["best_test_accuracy"] for f in fams if not f["control"]}
    for algo in ("pc", "dtp"):
        if algo in best and "bp" in best:
            gaps[algo] = {H: (None if a is None or best["bp"].get(H) is None else a - best["bp"][H])
                          for H, a in best[algo].items()}
    for algo, g in gaps.items():
        say(f"{algo} best test accuracy minus BP's (Depth-muP), per depth: "
            + ", ".join(f"H={H}: {v:+.3f}" if v is not None else f"H={H}: -" for H, v in g.items()))
    return {"title": title, "store": str(store), "figure": fig, "families": fams, "verdicts": verdicts,
            "accuracy_minus_bp": gaps, "grid_notes": notes,
            "lrs": {"depth-muP" if i == 0 else "depth-free": s["lrs"] for i, s in enumerate(final)},
            "report_command": f"mulocal report --store {store} --axis depth"}
