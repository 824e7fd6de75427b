"""``mulocal reproduce NAME``: the paper's experiments, with seeds, bands and SP controls.

Transfer experiments (fig1-left, fig1-right, fig7, cnn) are sweeps into ``OUT/NAME/results.sqlite``
(``mulocal report --store`` reads them; a rerun only trains what is missing) and write
``OUT/NAME/NAME.png``: test accuracy (top) and training loss (bottom) against the learning rate, a
curve per width with a min-max band over seeds, the estimated optimum marked, one column per
configuration. The analysis experiments (fig3, fig8, table1) write ``OUT/NAME/NAME.json`` and the
figure. Budgets: ``small`` fits each experiment in about 20 minutes on 2 CPU cores (narrower widths,
a data subset, one epoch, stated on the figure); ``paper`` uses widths up to 2048 and full epochs
and is meant for a GPU (``--device cuda``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..util import json_safe

LR_GRID_SMALL = [2.0 ** k for k in range(-6, 3)]
LR_GRID_PAPER = [2.0 ** k for k in range(-8, 4)]
BUDGETS = {
    "small": dict(widths=[64, 128, 256, 512], lrs=LR_GRID_SMALL, seeds=[0, 1, 2], epochs=1, train_subset=10000,
                  test_subset=5000),
    "paper": dict(widths=[128, 256, 512, 1024, 2048], lrs=LR_GRID_PAPER, seeds=[0, 1, 2], epochs=10,
                  train_subset=None, test_subset=None),
    # for the test suite only: the same code path in seconds (numbers meaningless)
    "tiny": dict(widths=[16, 32], lrs=[0.25, 1.0], seeds=[0, 1, 2], epochs=1, train_subset=600, test_subset=300),
}
ANALYSIS_WIDTHS = {"small": [64, 128, 256, 512, 1024], "paper": [128, 256, 512, 1024, 2048, 4096], "tiny": [16, 32]}
CNN_WIDTHS = {"small": [8, 16, 32], "paper": [16, 32, 64, 128, 256], "tiny": [4, 8]}

# name -> (title, list of sweep specs without the budget keys)
TRANSFER = {
    "fig1-left": ("PC with F-ini + FPA + SI, T = 1 (= SGD) under SGD's muP, vs SP",
                  [dict(algo="pc", param=["mup", "sp"],
                        algo_options={"fpa": True, "T": 1, "inference": "sequential", "init": "forward"})]),
    "fig1-right": ("PC without FPA, single-shot SI, its muP with gbar_L = 0 and 1, vs SP",
                   [dict(algo="pc", param="mup", gamma_bar_L=[0.0, 1.0], algo_options={"fpa": False, "T": 1}),
                    dict(algo="pc", param="sp", algo_options={"fpa": False, "T": 1})]),
    "fig7": ("TP (ridge feedback, the paper's theory) and DTP (trainable feedback) under their muP (b_L = 1/2), vs SP",
             [dict(algo=["tp", "dtp"], param=["mup", "sp"], algo_options={"tp": {"feedback": "ridge"}})]),
    "cnn": ("FashionMNIST CNN (channels = width): BP, PC, DTP under muP vs SP",
            [dict(algo=["bp", "pc", "dtp"], param=["mup", "sp"], arch="cnn", base_width=8)]),
}
ANALYSES = ("fig3", "fig8", "table1")
NAMES = tuple(TRANSFER) + ANALYSES


def _specs(name: str, budget: str) -> list[dict]:
    b = dict(BUDGETS[budget])
    if name == "cnn":
        b["widths"] = CNN_WIDTHS[budget]
        if budget == "small":
            b.update(train_subset=4000, test_subset=2000, lrs=[2.0 ** k for k in range(-5, 3)])
    return [dict(spec, optimizer="sgd", dataset="fashion-mnist", batch_size=128, **b) for spec in TRANSFER[name][1]]


def run(name: str, budget: str = "small", out_dir: str = "runs/reproduce", device: str = "cpu", data_dir=None,
        workers: int | None = None, json_mode: bool = False) -> dict:
    if name not in NAMES:
        raise ConfigError(f"unknown experiment '{name}'; choose one of {', '.join(NAMES)}")
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'; choose small or paper")
    from ..config import check_device
    if name in ANALYSES and (device or "cpu") != "cpu":
        raise ConfigError(f"{name} runs on the CPU only (float64 analyses): drop --device {device}")
    device = check_device(device or "cpu")
    tiny = budget == "tiny"
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, file=sys.stderr)) if json_mode else print
    t0 = time.perf_counter()
    if name in TRANSFER:
        res = _transfer(name, budget, out, device, data_dir, workers, say)
    elif name == "fig3":
        res = _fig3(budget, out, data_dir, say)
    elif name == "fig8":
        res = _fig8(budget, out, data_dir, say)
    else:
        res = _table1(budget, out, data_dir, say)
    if tiny:
        res["note"] = "tiny budget: a smoke run of the code path, not a result"
    res.update(name=name, budget=budget, seconds=time.perf_counter() - t0,
               command=f"mulocal reproduce {name} --budget {budget}")
    (out / f"{name}.json").write_text(json.dumps(json_safe(res), indent=1))
    if name in ANALYSES:  # the numbers live in a store too, so `mulocal report --store` shows every experiment
        from ..sweep.store import Store
        with Store(out / "results.sqlite") as st:
            st.put_result(name, json_safe(res))
        res["store"] = str(out / "results.sqlite")
        res["report_command"] = f"mulocal report --store {res['store']}"
    say(f"{name}: {res['seconds']:.0f} s; figure {res.get('figure')}")
    return res


# ------------------------------------------------------------------------------------ transfer
def _transfer(name, budget, out, device, data_dir, workers, say) -> dict:
    from ..sweep.transfer import analyze, format_table
    from ..config import config_hash
    from ..plots import transfer_figure
    from ..sweep import expand, run_sweep
    from ..sweep.store import Store

    store = out / "results.sqlite"
    specs = _specs(name, budget)
    hashes = []
    for spec in specs:
        run_sweep(spec, store, workers=workers, device=device, data_dir=data_dir, progress=True)
        hashes += [config_hash(c) for c in expand(spec)]
    with Store(store, create=False) as st:
        report = analyze(st.rows(hashes=hashes))
    title = TRANSFER[name][0]
    b = specs[0]
    sub = f"{b['train_subset'] or 'all'} training samples, {b['epochs']} epoch(s), {len(b['seeds'])} seeds, " \
          f"widths {b['widths']}"
    fig = transfer_figure(report, out / f"{name}.png", f"{title}\n({budget} budget: {sub})")
    say(format_table(report))
    fams = [{"label": f["label"], "family": f["family"],
             "best_lr": {str(e["width"]): e["best_lr"] for e in f["best"]},
             "slope": f["transfer"]["slope"], "slope_err": f["transfer"]["slope_err"],
             "penalty": f["transfer"]["penalty"],
             "best_test_accuracy": {str(c["width"]): max((p["test_accuracy_mean"] or 0) for p in c["points"])
                                    for c in f["curves"]}} for f in report["families"]]
    return {"title": title, "store": str(store), "figure": fig, "families": fams,
            "report_command": f"mulocal report --store {store}"}


# ------------------------------------------------------------------------------------ analyses
def _fig3(budget, out, data_dir, say) -> dict:
    from ..data import load_dataset
    from ..diagnostics.align import cosine_vs_width
    from ..plots import fig3_figure
    widths = {"small": [64, 128, 256, 512, 1024, 2048], "paper": [64, 128, 256, 512, 1024, 2048, 4096],
              "tiny": [16, 32]}[budget]
    data = load_dataset("fashion-mnist", data_dir, train_subset=1000, seed=0)
    x, y = data.x_train[:32].double().flatten(1), data.y_train[:32]
    panels = {}
    for act in ("linear", "tanh"):
        for g in (0.0, -1.0):
            say(f"fig3: {act}, gbar_L = {g:g}")
            ws = widths if act == "linear" or budget != "small" else widths[:-1]
            panels[f"{act} gbar_L={g:g}"] = cosine_vs_width(ws, x, y, activation=act, gamma_bar_L=g, seeds=(0, 1, 2))
    path = fig3_figure(panels, out / "fig3.png")
    for key, res in panels.items():
        eq = res["modes"]["pc-equilibrium"]["cos_bp"]
        say(f"  {key}: PC equilibrium cosine at width {res['widths'][0]}: "
            + "/".join(f"{c:.3f}" for c in eq[0]) + f", at {res['widths'][-1]}: " + "/".join(f"{c:.4f}" for c in eq[-1]))
    summary = {key: {"width": res["widths"][-1], "pc_equilibrium_cos_bp": [round(c, 4) for c in
                                                                            res["modes"]["pc-equilibrium"]["cos_bp"][-1]]}
               for key, res in panels.items()}
    return {"figure": str(path), "panels": panels, "summary": summary}


def _fig8(budget, out, data_dir, say) -> dict:
    from ..data import load_dataset
    from ..diagnostics.align import alignment_vs_step
    from ..diagnostics.coord import coord_batches
    from ..plots import fig8_figure
    widths = ANALYSIS_WIDTHS[budget]
    steps = {"small": 20, "paper": 100, "tiny": 2}[budget]
    data = load_dataset("fashion-mnist", data_dir)
    runs = {}
    for seed in (0, 1, 2):
        batches, probe = coord_batches(data, steps, 64, seed=seed)
        runs[seed] = alignment_vs_step([("bp", "mup"), ("tp", "mup"), ("dtp", "mup")], widths, batches, probe,
                                       lr=0.1, K=4)
        say(f"fig8: seed {seed} done")
    import numpy as np
    summary = {}
    for key in runs[0]["configs"]:
        m = np.array([runs[s]["configs"][key]["omega"] for s in runs]).mean(0)
        summary[key] = {"mean_over_steps": float(m.mean()), "per_step_mean": m.tolist()}
        say(f"  {key}: omega_L averaged over steps {m.mean():.3f}")
    path = fig8_figure(runs, widths, steps, out / "fig8.png")
    return {"figure": str(path), "omega_L": summary, "widths": widths, "steps": steps,
            "summary": {k: round(v["mean_over_steps"], 3) for k, v in summary.items()}}


TABLE1 = [("bp", "sgd", 0.0), ("bp", "adam", 0.0), ("pc", "sgd", -1.0), ("pc", "sgd", 0.0), ("pc", "sgd", 1.0),
          ("pc", "adam", 0.0), ("tp", "sgd", 0.0), ("dtp", "sgd", 0.0), ("dtp", "adam", 0.0)]


def _table1(budget, out, data_dir, say) -> dict:
    from ..algos import make_algo
    from ..data import load_dataset
    from ..diagnostics.coord import coord_batches
    from ..diagnostics.derive import derive
    from ..nets import build
    from ..param import preset
    from ..plots import table1_figure
    widths = ANALYSIS_WIDTHS[budget]
    data = load_dataset("fashion-mnist", data_dir)
    batches, probe = coord_batches(data, 1, 64, seed=0)
    rows = []
    for algo, opt, g in (TABLE1[:1] if budget == "tiny" else TABLE1):
        ref = preset("mup", opt, gamma_bar_L=g, algo=algo)
        start = preset("sp", opt, gamma_bar_L=g, algo=algo)

        def make(p, w):
            return build("mlp", data.input_shape, 10, w, p, K=4, seeds=range(4), bias=False)
        res = derive(make, make_algo(algo), start, widths, batches, probe, 0.1 if opt == "sgd" else 1e-3, opt,
                     reference=ref)
        row = {"algo": algo, "optimizer": opt, "gamma_bar_L": g, "fitted_b": res.b, "fitted_c": res.c,
               "spec_b": list(ref.b), "spec_c": list(ref.c), "max_deviation": res.max_deviation,
               "agrees": res.agrees, "fit_max_abs_slope": res.final.max_abs_slope, "rounds": len(res.rounds)}
        rows.append(row)
        say(f"table1: {algo:<4}{opt:<5} gbar {g:+g}: fitted b_L {res.b[2]:.2f}, c ({', '.join(f'{v:.2f}' for v in res.c)})"
            f" vs spec c ({', '.join(f'{v:g}' for v in ref.c)}), b_L {ref.b[2]:g}: "
            + ("agrees" if res.agrees else "DISAGREES"))
    path = table1_figure(rows, widths, out / "table1.png")
    return {"figure": str(path), "rows": rows, "widths": widths,
            "summary": [f"{r['algo']} {r['optimizer']} gbar {r['gamma_bar_L']:g}: b_L {r['fitted_b'][2]:.2f}, c "
                        + ", ".join(f"{v:.2f}" for v in r["fitted_c"]) + (" agrees" if r["agrees"] else " DISAGREES")
                        for r in rows]}


