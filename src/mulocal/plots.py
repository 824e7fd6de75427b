"""The figures of sweeps and width checks (matplotlib, Agg backend: no display needed; the analyses' figures:
``figures.py``). Each function takes plain results (a report dict, a CoordResult, ...) and a path, draws, and
returns the path.

* sweeps: ``plot_family``, ``plot_transfer``, ``plot_report`` (below);
* diagnostics: ``plot_coord`` (coordinate check), ``plot_derive`` (exponent fit), ``plot_lines``;
* the transfer experiments of ``reproduce``: ``transfer_figure``.

Sweep plots:

For every family (same configuration except width): the metric (training loss by default) and
the test accuracy against the learning rate on a log2 axis, one curve per width (mean over
seeds) with a band from the lowest to the highest seed, diverged learning rates marked with an
x at the top, and the estimated optimum by each panel's own metric marked with a dotted line and a star on
the curve. ``transfer.png``
puts log2(best LR) against log2(width) for every family, with the bootstrap error bars and the
fitted line whose slope the report gives.
"""
from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_") or "family"


def on_curve(xs, ys, x0: float, log_y: bool = False) -> float | None:
    """The height at ``x0`` of the curve drawn through (xs, ys) on a log2 x axis (straight segments on the plot:
    linear in log2 x, and in log y on a log y axis); None outside the drawn points."""
    pts = sorted(zip(xs, ys))
    if not pts or not pts[0][0] <= x0 <= pts[-1][0]:
        return None
    for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[-1:]):
        if xa <= x0 <= xb:
            t = 0.0 if xb == xa else (math.log2(x0) - math.log2(xa)) / (math.log2(xb) - math.log2(xa))
            if log_y and ya > 0 and yb > 0:
                return math.exp((1 - t) * math.log(ya) + t * math.log(yb))
            return (1 - t) * ya + t * yb
    return None


def _panel(ax, fam, key, lo_key, hi_key, best_by_w, ylabel, mark_best_y: bool, log_y: bool, axis: str = "width"):
    """One panel: ``key`` against the learning rate, a curve per width with its seed band; ``best_by_w`` (width ->
    a report's best entry, by this panel's metric) marked by a dotted line and, with ``mark_best_y``, a star on the
    drawn curve at that learning rate."""
    from matplotlib import transforms
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    widths = [c["width"] for c in fam["curves"]]
    top = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for i, c in enumerate(fam["curves"]):
        color = cmap(i / max(len(widths) - 1, 1))
        pts = c["points"]
        xs = [p["lr"] for p in pts if p[key] is not None and math.isfinite(p[key])]
        ys = [p[key] for p in pts if p[key] is not None and math.isfinite(p[key])]
        ax.plot(xs, ys, "o-", ms=3, lw=1.4, color=color, label=f"{axis} {c['width']}")
        band = [(p["lr"], p[lo_key], p[hi_key]) for p in pts if p[lo_key] is not None and p[hi_key] is not None]
        if band:
            bx, blo, bhi = zip(*band)
            ax.fill_between(bx, blo, bhi, color=color, alpha=0.15, lw=0)
        div = [p["lr"] for p in pts if p["n_diverged"]]
        if div:
            ax.plot(div, [0.97] * len(div), "x", color=color, ms=6, transform=top, clip_on=False)
        b = best_by_w.get(c["width"])
        if b and b["best_lr"] is not None:
            ax.axvline(b["best_lr"], color=color, ls=":", lw=1)
            y = on_curve(xs, ys, b["best_lr"], log_y) if mark_best_y else None
            if y is not None:  # on the curve: the fitted parabola's own value may lie well off the measured points
                ax.plot([b["best_lr"]], [y], "*", color=color, ms=12, mec="k", mew=0.5, zorder=5)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("base learning rate", fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.25, which="both")


def family_figure(fam: dict, metric: str, acc_fam: dict | None = None):
    """The figure of ``plot_family`` (left: the report's metric, right: test accuracy; each panel marks the optima
    by its own metric: ``acc_fam`` is the family in the test-accuracy report, None: no optimum on the right unless
    the metric is test accuracy)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6))
    best_by_w = {e["width"]: e for e in fam["best"]}
    acc_src = fam if metric == "test_accuracy" else acc_fam
    best_acc = {e["width"]: e for e in acc_src["best"]} if acc_src else {}
    vals = [p["min"] for c in fam["curves"] for p in c["points"] if p["min"] is not None]
    log_y = metric != "test_accuracy" and bool(vals) and min(vals) > 0
    ylabel = {"train_loss": "training loss (last epoch, mean over seeds)", "test_loss": "test loss",
              "test_accuracy": "test accuracy"}[metric]
    _panel(a1, fam, "mean", "min", "max", best_by_w, ylabel, True, log_y)
    _panel(a2, fam, "test_accuracy_mean", "test_accuracy_min", "test_accuracy_max", best_acc, "test accuracy",
           True, False)
    a1.legend(fontsize=9)
    t = fam["transfer"]
    title = fam["label"]
    if t["slope"] is not None:
        err = f" ± {t['slope_err']:.2f}" if t["slope_err"] is not None else ""
        title += f": slope of log2(best LR) vs log2(width) {t['slope']:+.2f}{err}"
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, "curves: mean over seeds, one per width; bands: min-max over seeds; x at the top: a seed "
             "diverged at that LR; dotted line and star: the estimated optimum by that panel's metric (quadratic "
             "vertex in log2 LR), the star on the curve.", fontsize=8.5, wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_family(fam: dict, metric: str, path, acc_fam: dict | None = None) -> str:
    plt = _plt()
    fig = family_figure(fam, metric, acc_fam)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _transfer_panel(ax, report: dict) -> None:
    pairs: dict[str, int] = {}  # a configuration under muP and under SP share a colour
    for f in report["families"]:
        pts = [e for e in f["best"] if e["best_lr"] is not None]
        if not pts:
            continue
        param = str(f["family"].get("param", ""))
        key = " ".join(w for w in f["label"].split() if w != param)
        color = f"C{pairs.setdefault(key, len(pairs)) % 10}"
        sp = param.startswith("sp")
        ws = [e["width"] for e in pts]
        ys = [e["log2_best_lr"] for e in pts]
        errs = [e["log2_std"] or 0.0 for e in pts]
        t = f["transfer"]
        label = f["label"]
        if t["slope"] is not None:
            label += f" (slope {t['slope']:+.2f} ± {t['slope_err'] or 0:.2f}"
            label += "" if t["penalty"] is None else (", penalty diverges)" if not math.isfinite(t["penalty"])
                                                      else f", penalty {t['penalty']:.3g})")
        ax.errorbar(ws, ys, yerr=errs, fmt="s" if sp else "o", mfc="white" if sp else color, color=color,
                    capsize=3, label=label)
        if t["slope"] is not None:
            xs = [min(ws), max(ws)]
            ax.plot(xs, [t["slope"] * math.log2(x) + t["intercept"] for x in xs], "--" if sp else "-", lw=1,
                    color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(report.get("axis", "width"))
    ax.set_ylabel("log2(best learning rate)")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8)
    what = {"train_loss": "training loss", "test_loss": "test loss", "test_accuracy": "test accuracy"}[report["metric"]]
    ax.set_title(f"best learning rate by {what} (flat = transfers)", fontsize=10)


def plot_transfer(report: dict, path, other: dict | None = None) -> str:
    """log2(best LR) against width per family, with the fitted slope, its error and the penalty in the legend;
    with ``other`` (the report by the other metric) a second panel by that metric."""
    plt = _plt()
    reports = [report] + ([other] if other is not None else [])
    fig, axes = plt.subplots(1, len(reports), figsize=(7.5 * len(reports), 4.8), squeeze=False)
    for ax, rep in zip(axes[0], reports):
        _transfer_panel(ax, rep)
    fig.text(0.01, 0.005, "same colour: one configuration; filled circles and solid fit: muP; open squares and dashed "
             "fit: SP. Error bars: bootstrap std of log2(best LR) over seeds and fit windows (including the LR "
             "grid's resolution); lines: least-squares fit. penalty: extra loss (or error) at the largest width "
             "with the smallest width's best LR.", fontsize=8.5, wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_report(report: dict, out_dir, other: dict | None = None) -> list[str]:
    """Write one PNG per family and ``transfer.png`` (both metrics with ``other``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, used = [], set()
    by_acc = {f["label"]: f for f in other["families"]} if other and other["metric"] == "test_accuracy" else {}
    for f in report["families"]:
        name = slug(f["label"])
        while name in used:
            name += "_"
        used.add(name)
        paths.append(plot_family(f, report["metric"], out / f"{name}.png", by_acc.get(f["label"])))
    if report["families"]:
        paths.append(plot_transfer(report, out / "transfer.png", other))
    return paths


# ------------------------------------------------------------------------------ diagnostics
def plot_coord(res, path: str, title: str = "") -> str:
    """Coordinate check: a panel per quantity, its RMS against width for every measured step (colour = step),
    on log-log axes spanning at least three decades around the data, so that a flat quantity looks flat; the
    panel title gives the fitted slope per doubling of width (counted quantities in bold)."""
    import math
    plt = _plt()
    names = list(res.rms)
    ncol = min(5, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.9 * ncol, 2.5 * nrow), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, names):
        table = res.rms[name]  # [width][step]
        steps = len(table[0]) if table else 0
        vals = [v for row in table for v in row if v and math.isfinite(v) and v > 0]
        for t in range(steps):
            ax.plot(res.widths, [row[t] for row in table], "o-", ms=3, lw=1,
                    color=cmap(t / max(steps - 1, 1)), label=f"step {t + 1}")
        ax.set_xscale("log", base=2)
        if vals:  # an all-zero panel (an unresolved aligned excess) stays linear: nothing to log-scale
            ax.set_yscale("log")
            lo, hi = min(vals), max(vals)
            mid = math.sqrt(lo * hi)
            ax.set_ylim(min(lo / 2, mid / 10 ** 1.5), max(hi * 2, mid * 10 ** 1.5))
        counted = name in getattr(res, "counted", ())
        ax.set_title(f"{name}: slope {res.slopes[name]:+.2f}", fontsize=8, fontweight="bold" if counted else "normal")
        ax.set_xlabel(getattr(res, "axis", "width"), fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.25, which="both")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel("RMS")
    if names:
        axes[0][0].legend(fontsize=6)
    fig.suptitle((title + "; " if title else "") + f"coordinate check across {getattr(res, 'axis', 'width')}: bold = "
                 "counted quantities (flat under muP: |slope| <= 0.15)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_derive(res, path: str, title: str = "") -> str:
    """Exponent fit: fitted b and c per role against the reference, and the slopes of the fitted table."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    roles = ["input", "hidden", "output"]
    x = range(3)
    axes[0].plot(x, res.c, "o-", label="fitted c")
    axes[0].plot(x, res.b, "s-", label="fitted b")
    if res.reference:
        axes[0].plot(x, res.reference.c, "o:", color="gray", label=f"{res.reference.name} c")
        axes[0].plot(x, res.reference.b, "s:", color="silver", label=f"{res.reference.name} b")
    axes[0].set_xticks(list(x), roles)
    axes[0].set_ylabel("exponent")
    axes[0].legend(fontsize=7)
    if res.final is not None:
        names = res.final.counted
        axes[1].bar(range(len(names)), [res.final.slopes[n] for n in names])
        axes[1].axhline(0.15, color="r", lw=0.8, ls=":")
        axes[1].axhline(-0.15, color="r", lw=0.8, ls=":")
        axes[1].set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        axes[1].set_ylabel("slope vs width (fitted table)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lines(path: str, x, series: dict[str, list], xlabel: str, ylabel: str, title: str = "", logx=True,
               logy=False) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, ys in series.items():
        ax.plot(x, ys, "o-", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ reproduce figures
def _transfer_text(t: dict | None, what: str) -> str:
    if not t or t.get("slope") is None:
        return f"{what}: -"
    pen = t.get("penalty")
    pen = "-" if pen is None else ("diverges" if not math.isfinite(pen) else f"{pen:.3g}")
    return f"{what}: slope {t['slope']:+.2f} ± {t['slope_err'] or 0:.2f}, penalty {pen}"


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to the characters that fit ``width_in`` inches at ``fontsize`` points, each line of it."""
    cols = max(40, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(part, cols) for part in text.split("\n"))


def transfer_figure(report: dict, path, title: str, other: dict | None = None, baseline: dict | None = None) -> str:
    """A reproduce figure: per family (column), test accuracy (top) and training loss (bottom) against the
    learning rate, a curve per width with its min-max band over seeds and the estimated optimum by each row's
    metric (the accuracy row's from ``other`` when it is the test-accuracy report).

    Each column's title gives the transfer slope and penalty by both metrics (``report`` by one, ``other``
    by the other, matched by family label). ``baseline``: width -> best test accuracy of the feature-learning
    baseline (the readout trained on frozen random features), drawn as a dashed line per width. The figure's
    title is ``title``; what the marks mean is a caption under the panels."""
    plt = _plt()
    fams = report["families"]
    others = {f["label"]: f for f in (other or {}).get("families", [])}
    acc_fams = others if other is not None and other["metric"] == "test_accuracy" else {}
    width_in = max(4.2 * len(fams), 8.5)
    fig, axes = plt.subplots(2, len(fams), figsize=(width_in, 7.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for j, f in enumerate(fams):
        best = {e["width"]: e for e in f["best"]}
        acc_best = {e["width"]: e for e in acc_fams[f["label"]]["best"]} if f["label"] in acc_fams else {}
        _panel(axes[0][j], f, "test_accuracy_mean", "test_accuracy_min", "test_accuracy_max", acc_best,
               "test accuracy", True, False, axis=report.get("axis", "width"))
        positive = any((p["min"] or 0) > 0 for c in f["curves"] for p in c["points"])
        _panel(axes[1][j], f, "mean", "min", "max", best, "training loss", True, positive,
               axis=report.get("axis", "width"))
        by = {report["metric"]: f["transfer"]}
        if other is not None:
            by[other["metric"]] = (others.get(f["label"]) or {}).get("transfer")
        lines = [_transfer_text(by.get(m), name) for m, name in (("train_loss", "loss"), ("test_accuracy", "acc"))
                 if m in by]
        axes[0][j].set_title(f["label"] + "\n" + "\n".join(lines), fontsize=8.5)
        widths = [c["width"] for c in f["curves"]]
        for i, w in enumerate(widths):
            if baseline and baseline.get(w) is not None:
                axes[0][j].axhline(baseline[w], color=cmap(i / max(len(widths) - 1, 1)), ls="--", lw=0.9,
                                   label="readout only (frozen features)" if i == len(widths) - 1 else None)
        best_acc = [max((p["test_accuracy_mean"] or 0) for p in c["points"]) for c in f["curves"]]
        if best_acc:  # show the useful range: from 0.25 below the worst width's best accuracy
            axes[0][j].set_ylim(max(0.0, min(best_acc) - 0.25), min(1.0, max(best_acc + [v for v in (baseline or {}).values()
                                                                                     if v is not None])
                                                                     + 0.03))
    axes[0][0].legend(fontsize=8)
    caption = ("bands: min-max over seeds; dotted lines and stars (on the curve): the estimated best LR by that row's "
               "metric (quadratic vertex in log2 LR of the seed mean); x: a seed diverged"
               + ("; dashed: best accuracy of the readout alone on frozen random features" if baseline else ""))
    caption = _wrap(caption, width_in, 8.5)
    fig.suptitle(_wrap(title, width_in, 10), fontsize=10)
    fig.text(0.01, 0.01, caption, fontsize=8.5, va="bottom")
    fig.tight_layout(rect=(0, 0.02 + 0.022 * (caption.count("\n") + 1), 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


__all__ = ["family_figure", "on_curve", "plot_coord", "plot_derive", "plot_family", "plot_lines", "plot_report",
           "plot_transfer", "transfer_figure"]
