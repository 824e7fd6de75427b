"""The figures of the analyses (``reproduce`` fig3, fig8, table1, fig7's feature learning; ``analyze layers`` and
``features``), matplotlib on the Agg backend as in ``plots.py``: each takes plain results and a path, draws, and
returns the path.
"""
from __future__ import annotations

from .plots import _plt


def layers_figure(results: dict, path, title: str) -> str:
    """Every layer's relative weight update ||Delta W_l|| / ||W_l(0)|| against its index, a line per rule
    (``diagnostics.layers`` results by configuration), log scale, the top block's tenth marked per rule."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (key, r) in enumerate(results.items()):
        ls = range(1, r["depth"] + 1)
        ax.plot(ls, r["dW_rel"], "o-", ms=2.5, lw=1.2, color=f"C{i}",
                label=f"{key} (smallest block / top: {r['min_ratio']:.2g})")
        top = r["dW_rel"][r["depth"] - 2]
        ax.axhline(top / 10, color=f"C{i}", ls=":", lw=0.9)
    ax.set_yscale("log")
    ax.set_xlabel("layer l (1: input layer, last: readout)")
    ax.set_ylabel("||W_l(T) - W_l(0)|| / ||W_l(0)||")
    ax.grid(alpha=0.25, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title + "\ndotted: a tenth of the top block's relative update", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def features_figure(results: dict, path, title: str) -> str:
    """Feature learning vs width (``diagnostics.features`` results by configuration): rms(W_L Delta h_{L-1})
    after the first and the last recorded step, its first-order part rms(W_L(0) Delta h_{L-1}) / rms(Delta f)
    and the last hidden layer's relative feature change at the last step; mean over replicas with a min-max
    band; each legend entry carries the width slope."""
    import numpy as np
    plt = _plt()
    panels = (("feat", 0, "rms(W_L(t) dh_(L-1)) after step 1"),
              ("feat", -1, "rms(W_L(t) dh_(L-1)) after the last step"),
              ("share_init", -1, "rms(W_L(0) dh_(L-1)) / rms(df), last step"),
              ("dh_rel_2", -1, "||dh_(L-1)|| / ||h_(L-1)(0)||, last step"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.4))
    for (q, t, label), ax in zip(panels, axes):
        for i, (key, r) in enumerate(results.items()):
            if q not in r["values"]:
                continue
            w = r["widths"]
            mean = [row[t] for row in r["values"][q]]
            reps = np.asarray([row[t] for row in r["per_replica"][q]], dtype=float)
            slope = r["slopes_per_step"][q][t]
            ls = "--" if "bL1" in key else "-"
            ax.plot(w, mean, "o" + ls, ms=3, color=f"C{i}", label=f"{key}: slope {slope:+.2f}")
            ax.fill_between(w, reps.min(1), reps.max(1), color=f"C{i}", alpha=0.15, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_title(label, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle(title + "\nsolid: b_L = 1/2 (TP's muP) or BP's muP; dashed: b_L = 1 (mup-bL1); bands: min-max "
                 "over seeds", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


def fig3_figure(panels: dict, path) -> str:
    """Fig. 3: per-layer cosine with BP against width, a column per (activation, gbar_L), a row per mode."""
    plt = _plt()
    modes = (("pc-equilibrium", "PC at equilibrium"), ("pc-single-shot", "PC single-shot (no FPA)"), ("gnt", "GNT"))
    fig, grid = plt.subplots(3, 4, figsize=(15, 8.4), sharex=True)
    for j, (key, res) in enumerate(panels.items()):
        for i, (mode, label) in enumerate(modes):
            ax = grid[i][j]
            rows, seeds = res["modes"][mode]["cos_bp"], res["modes"][mode]["cos_bp_seeds"]
            for l in range(len(rows[0])):
                ax.plot(res["widths"], [r[l] for r in rows], marker="o", ms=3, color=f"C{l}", label=f"layer {l + 1}")
                ax.fill_between(res["widths"], [min(s[l]) for s in seeds], [max(s[l]) for s in seeds],
                                color=f"C{l}", alpha=0.2, lw=0)  # min-max over seeds
            ax.set_xscale("log", base=2)
            ax.set_title(f"{label}: {key}", fontsize=8)
            ax.grid(alpha=0.3)
            if i == 2:
                ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel("cosine with BP")
    axes = grid[0]
    axes[0].legend(fontsize=7)
    fig.suptitle("Fig. 3: per-layer cosine of PC (equilibrium, single-shot) and GNT updates with BP, vs width "
                 "(mean and min-max band over 3 seeds, batch 32)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


def fig8_figure(runs: dict, widths, steps: int, path) -> str:
    """Fig. 8: the alignment exponent omega_L per training step, mean and min-max band over seeds."""
    import numpy as np
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, key in enumerate(runs[next(iter(runs))]["configs"]):
        om = np.array([runs[s]["configs"][key]["omega"] for s in runs])
        xs = range(1, steps + 1)
        ax.plot(xs, om.mean(0), color=f"C{i}", label=key)
        ax.fill_between(xs, om.min(0), om.max(0), color=f"C{i}", alpha=0.2)
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("omega_L (fitted across widths)")
    ax.set_title(f"Fig. 8: alignment exponent of W_L Delta h_(L-1); widths {widths[0]}..{widths[-1]}, {len(runs)} seeds",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


def table1_figure(rows: list, widths, path) -> str:
    """Table 1: the exponents fitted from SP next to the spec's, as a table figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ax.axis("off")
    cells = [[f"{r['algo'].upper()} {r['optimizer']}" + (f" gbar={r['gamma_bar_L']:g}" if r["algo"] == "pc" else ""),
              f"{r['fitted_b'][2]:.2f}", ", ".join(f"{v:.2f}" for v in r["fitted_c"]), f"{r['spec_b'][2]:g}",
              ", ".join(f"{v:g}" for v in r["spec_c"]), f"{r['max_deviation']:.2f}"] for r in rows]
    tab = ax.table(cellText=cells, colLabels=["rule", "fitted b_L", "fitted c", "spec b_L", "spec c", "max dev"],
                   loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    ax.set_title(f"Table 1: exponents fitted from SP by the coordinate check (widths {widths[0]}..{widths[-1]})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


__all__ = ["features_figure", "fig3_figure", "fig8_figure", "layers_figure", "table1_figure"]
