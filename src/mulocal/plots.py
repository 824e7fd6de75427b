"""Transfer plots of a sweep report (matplotlib, Agg backend: no display needed).

For every family (same configuration except width): the metric (training loss by default) and
the test accuracy against the learning rate on a log2 axis, one curve per width (mean over
seeds) with a band from the lowest to the highest seed, diverged learning rates marked with an
x at the top, and the estimated optimum marked with a star and a dotted line. ``transfer.png``
puts log2(best LR) against log2(width) for every family, with the bootstrap error bars and the
fitted line whose slope the report gives.
"""
from __future__ import annotations

import math
import re
from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_") or "family"


def _panel(ax, fam, key, lo_key, hi_key, best_by_w, ylabel, mark_best_y: bool, log_y: bool):
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
        ax.plot(xs, ys, "o-", ms=3, lw=1.4, color=color, label=f"width {c['width']}")
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
            if mark_best_y and b["best_value"] is not None and math.isfinite(b["best_value"]):
                ax.plot([b["best_lr"]], [b["best_value"]], "*", color=color, ms=12, mec="k", mew=0.5, zorder=5)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("base learning rate")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.25, which="both")


def plot_family(fam: dict, metric: str, path) -> str:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    best_by_w = {e["width"]: e for e in fam["best"]}
    vals = [p["min"] for c in fam["curves"] for p in c["points"] if p["min"] is not None]
    log_y = metric != "test_accuracy" and bool(vals) and min(vals) > 0
    ylabel = {"train_loss": "training loss (last epoch, mean over seeds)", "test_loss": "test loss",
              "test_accuracy": "test accuracy"}[metric]
    _panel(a1, fam, "mean", "min", "max", best_by_w, ylabel, True, log_y)
    _panel(a2, fam, "test_accuracy_mean", "test_accuracy_min", "test_accuracy_max", best_by_w, "test accuracy",
           False, False)
    a1.legend(fontsize=8)
    t = fam["transfer"]
    title = fam["label"]
    if t["slope"] is not None:
        err = f" ± {t['slope_err']:.2f}" if t["slope_err"] is not None else ""
        title += f": slope of log2(best LR) vs log2(width) {t['slope']:+.2f}{err}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_transfer(report: dict, path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for f in report["families"]:
        pts = [e for e in f["best"] if e["best_lr"] is not None]
        if not pts:
            continue
        ws = [e["width"] for e in pts]
        ys = [e["log2_best_lr"] for e in pts]
        errs = [e["log2_std"] or 0.0 for e in pts]
        t = f["transfer"]
        label = f["label"] + (f" (slope {t['slope']:+.2f})" if t["slope"] is not None else "")
        line = ax.errorbar(ws, ys, yerr=errs, fmt="o", capsize=3, label=label)
        if t["slope"] is not None:
            xs = [min(ws), max(ws)]
            ax.plot(xs, [t["slope"] * math.log2(x) + t["intercept"] for x in xs], "-", lw=1,
                    color=line[0].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("log2(best learning rate)")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7)
    ax.set_title("best learning rate against width (flat = transfers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_report(report: dict, out_dir) -> list[str]:
    """Write one PNG per family and ``transfer.png`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, used = [], set()
    for f in report["families"]:
        name = slug(f["label"])
        while name in used:
            name += "_"
        used.add(name)
        paths.append(plot_family(f, report["metric"], out / f"{name}.png"))
    if report["families"]:
        paths.append(plot_transfer(report, out / "transfer.png"))
    return paths


__all__ = ["plot_report", "plot_family", "plot_transfer"]
