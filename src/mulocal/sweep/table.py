"""The transfer report as text: best learning rates per width (or depth), transfer metrics and verdicts."""
from __future__ import annotations

import math

from ..config import canonical_json
from .verdict import SEPARATION_SIGMAS, TRANSFER_BOUND, verdicts

def _fmt_lr(e: dict) -> str:
    if e is not None and e.get("censored"):
        return f"<{e['lr_min']:.3g}"  # every LR diverged: the optimum is below the grid
    if e is None or e.get("best_lr") is None:
        return "-"
    s = f"{e['best_lr']:.3g}"
    if e["at_edge"]:
        s += "!"
    elif e["method"] == "argmin":
        s += "~"
    return s


LEARN_FLOOR = 0.5  # a family whose best test accuracy stays below this at every width is flagged "does not learn"


def best_accuracy(fam: dict) -> dict[int, float | None]:
    """Per width, the best seed-mean test accuracy over the learning-rate grid."""
    out = {}
    for c in fam["curves"]:
        accs = [p["test_accuracy_mean"] for p in c["points"] if p["test_accuracy_mean"] is not None]
        out[c["width"]] = max(accs) if accs else None
    return out


def learns(fam: dict, floor: float = LEARN_FLOOR) -> bool:
    return any(a is not None and a >= floor for a in best_accuracy(fam).values())


def _slope_text(t: dict) -> str:
    if t["slope"] is None:
        return "-"
    text = f"{t['slope']:+.2f}" + (f" ± {t['slope_err']:.2f}" if t["slope_err"] is not None else "")
    return text + (f" [<={t['slope_bound']:+.2f}]" if t.get("slope_bound") is not None else "")


def _pen_text(t: dict) -> str:
    if t["penalty"] is None:
        return "-"
    return "diverges" if not math.isfinite(t["penalty"]) else f"{t['penalty']:.4f}"


OTHER_NAMES = {"test_accuracy": "acc", "train_loss": "loss", "test_loss": "test loss"}  # the other metric's columns


def format_table(report: dict, other: dict | None = None, floor: float = LEARN_FLOOR) -> str:
    """The best learning rate per width and the transfer metrics of every family, as a text table.

    With ``other`` (the report of the other metric, e.g. test accuracy), its penalty and slope are shown
    too; the best test accuracy at the largest width is always shown, and a family that never reaches
    ``floor`` is flagged (its transfer numbers say nothing about training)."""
    fams = report["families"]
    if not fams:
        c = report.get("cells", {})
        return f"no finished cells (store: {sum(c.values())} cells: " + \
            ", ".join(f"{v} {k}" for k, v in c.items() if v) + ")"
    widths = sorted({w for f in fams for w in f["widths"]})
    lw = max(14, max(len(f["label"]) for f in fams) + 2)
    what = "1 - test accuracy" if report["metric"] == "test_accuracy" else report["metric"].replace("_", " ")
    others = {canonical_json(f["family"]): f for f in (other or {}).get("families", [])}
    o_what = "" if other is None else OTHER_NAMES[other["metric"]]
    ow = 3 + max(14, len(f"penalty({o_what})"))  # the other metric's penalty column: its header never touches slope's
    bounded = any(g["transfer"].get("slope_bound") is not None for g in fams + (other or {}).get("families", []))
    sw = 25 if bounded else 17  # the slope columns (wider with a bounded slope)
    head = f"{'config':<{lw}}" + "".join(f"{w:>10}" for w in widths) + f"{'penalty':>11}{'slope':>{sw}}"
    if other is not None:
        head += f"{'penalty(' + o_what + ')':>{ow}}{'slope(' + o_what + ')':>{sw}}"
    head += f"{'best acc':>10}"
    ax = report.get("axis", "width")
    lines = [f"best learning rate per {ax} ({what}, mean over seeds; quadratic vertex in log2 LR)", head]
    quiet = []
    for f in fams:
        by_w = {e["width"]: e for e in f["best"]}
        t = f["transfer"]
        row = f"{f['label']:<{lw}}" + "".join(f"{_fmt_lr(by_w.get(w)):>10}" for w in widths)
        row += f"{_pen_text(t):>11}{_slope_text(t):>{sw}}"
        if other is not None:
            o = others.get(canonical_json(f["family"]))
            pen, slope = (_pen_text(o["transfer"]), _slope_text(o["transfer"])) if o else ("-", "-")
            row += f"{pen:>{ow}}{slope:>{sw}}"
        acc = best_accuracy(f).get(max(f["widths"])) if f["widths"] else None
        row += f"{'-' if acc is None else f'{acc:.3f}':>10}"
        if not learns(f, floor):
            row += "  does not learn"
            quiet.append(f["label"])
        if f.get("inference", {}).get("warned_cells"):
            row += "  inference!"
        if f.get("inference", {}).get("unconverged_cells"):
            row += "  unconverged"
        lines.append(row)
    lines.append("penalty: extra "
                 f"{'error' if report['metric'] == 'test_accuracy' else 'loss'} at the largest {ax} with the "
                 f"smallest {ax}'s best LR (what muTransfer promises: 0). slope: d log2(best LR) / d log2({ax}) "
                 f"(0: the optimum transfers). best acc: best seed-mean test accuracy at the largest {ax}.")
    if quiet:
        lines.append(f"does not learn: best test accuracy below {floor:g} at every {ax}; its transfer numbers "
                     "say nothing about training")
    if any(e["at_edge"] for f in fams for e in f["best"] if e["best_lr"] is not None):
        lines.append("!: the minimum is at the edge of the LR grid (the optimum may lie outside it)")
    if any(e["method"] == "argmin" and not e["at_edge"] for f in fams for e in f["best"] if e["best_lr"] is not None):
        lines.append("~: grid minimum (no quadratic vertex inside the fitted points)")
    if any(e.get("censored") for f in fams for e in f["best"]):
        lines.append(f"<lr: every LR of the grid diverged (a seed at each): the optimum lies below it. [<=s]: the slope "
                     f"with those values at the grid point below the grid, an upper bound (the verdict's for a control)")
    pairs = verdicts(report, other)
    if pairs:
        lines.append(f"verdict (muP vs its SP control; separated: |slope gap| > {SEPARATION_SIGMAS:g} sigma, one-sided on "
                     f"a bound; transfers: |slope| <= {TRANSFER_BOUND:g}; the paper's metric is test accuracy):")
        for v in pairs:
            parts = []
            for m in ("test_accuracy", "train_loss"):
                if m in v:
                    d = v[m]
                    gap = "" if d["gap"] is None else f" (gap {d['gap']:+.2f} ± {d['gap_err']:.2f})"
                    parts.append(f"by {'test accuracy' if m == 'test_accuracy' else 'training loss'}: "
                                 f"{d['verdict']}{gap}")
            lines.append(f"  {v['label']} vs {v['control']}: " + "; ".join(parts))
    inferring = [f for f in fams if f.get("inference") and (f["inference"]["energy_rose_max"] is not None
                                                          or f["inference"]["residual_median"] is not None)]
    if inferring:
        lines.append("PC inference over the last epoch of each finished cell (energy rise at any inference step; "
                     "||dF/dv|| at the end over the start):")
        lines += [_inference_line(f["label"], f["inference"]) for f in inferring]
    c = report.get("cells", {})
    if c.get("pending") or c.get("running") or c.get("failed"):
        lines.append(f"unfinished cells left out: {c.get('pending', 0)} pending, {c.get('running', 0)} running, "
                     f"{c.get('failed', 0)} failed")
    return "\n".join(lines)


def _inference_line(label: str, inf: dict) -> str:
    text = f"  {label}: {inf['cells']} cells"
    if inf["energy_rose_max"] is not None:
        text += (f", energy rose in {inf['energy_rose_cells']} (up to {100 * inf['energy_rose_max']:.3g}% of steps)"
                 if inf["energy_rose_cells"] else ", energy never rose")
    if inf["residual_median"] is not None:
        text += f", final relative residual median {inf['residual_median']:.3g} (max {inf['residual_max']:.3g})"
    if inf.get("unconverged_cells"):
        text += (f"  NOT CONVERGED in {inf['unconverged_cells']} cells (final relative residual > "
                 f"{inf['converged_below']:g}: more steps T, or the error solver)")
    if inf["warned_cells"]:
        text += f"  WARNING: unstable inference in {inf['warned_cells']} cells"
        if inf.get("warned_min_lr") is not None:
            text += f" (learning rates >= {inf['warned_min_lr']:.3g})"
    return text
