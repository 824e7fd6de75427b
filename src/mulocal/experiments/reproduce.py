"""``mulocal reproduce NAME``: the paper's experiments, with seeds, bands and SP controls.

``depth`` (our own: learning-rate transfer across depth, experiments/depth.py) is a sweep too.
Transfer experiments (fig1-left, fig1-right, fig7, cnn) are sweeps into ``OUT/NAME/results.sqlite``
(``mulocal report --store`` reads them; a rerun only trains what is missing) and write
``OUT/NAME/NAME.png``: test accuracy (top) and training loss (bottom) against the learning rate, a
curve per width with a min-max band over seeds, the estimated optimum marked, one column per
configuration. The analysis experiments (fig3, fig8, table1) write ``OUT/NAME/NAME.json`` and the
figure. Budgets: ``small`` runs each experiment in 2-6 minutes on 2 CPU cores, the CNN in about 30 (narrower widths,
a data subset, one epoch, stated on the figure); ``paper`` uses widths up to 2048 and full epochs
and is meant for a GPU (``--device cuda``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import ConfigError, MulocalError, check_choice
from ..util import json_safe, rule_label
from .grids import family_entry, say_verdicts, sweep_until_bracketed

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
# The CNN's own coordinate check passes from 32 channels on (max |slope| 0.145 over 32-256; 0.238 over 8-64):
# its widths start there, and so does its base width (muP = SP at the smallest width, as for the MLP).
CNN_WIDTHS = {"small": [32, 64, 128], "paper": [32, 64, 128, 256, 512], "tiny": [4, 8]}
CNN_BASE_WIDTH = {"small": 32, "paper": 32, "tiny": 4}

# the feature-learning baseline: the readout trained alone on frozen random features (BP under muP)
BASELINE = dict(algo="bp", param="mup", algo_options={"readout_only": True})

# name -> (title, list of sweep specs without the budget keys)
TRANSFER = {
    "fig1-left": ("PC with F-ini + FPA + SI, T = 1 (= SGD) under SGD's muP, vs SP",
                  [dict(algo="pc", param=["mup", "sp"],
                        algo_options={"fpa": True, "T": 1, "inference": "sequential", "init": "forward"})]),
    "fig1-right": ("PC without FPA, single-shot SI, its muP with gbar_L = 0 and 1, vs SP",
                   [dict(algo="pc", param="mup", gamma_bar_L=[0.0, 1.0], algo_options={"fpa": False, "T": 1}),
                    dict(algo="pc", param="sp", algo_options={"fpa": False, "T": 1})]),
    "fig7": ("TP (ridge feedback, the paper's theory) and DTP (trainable feedback) under their muP (b_L = 1/2), "
             "the b_L = 1 control (mup-bL1), vs SP",
             [dict(algo=["tp", "dtp"], param=["mup", "mup-bL1", "sp"], algo_options={"tp": {"feedback": "ridge"}})]),
    "cnn": ("FashionMNIST CNN (channels = width): BP, PC, DTP under muP vs SP",
            [dict(algo=["bp", "pc", "dtp"], param=["mup", "sp"], arch="cnn")]),
}
ANALYSES = ("fig3", "fig8", "table1")
OWN = ("depth",)  # experiments of our own, beyond the paper (experiments/depth.py)
NAMES = tuple(TRANSFER) + ANALYSES + OWN


def _specs(name: str, budget: str) -> list[dict]:
    """The experiment's sweep specs at a budget, the feature-learning baseline last."""
    b = dict(BUDGETS[budget])
    extra = {}
    if name == "cnn":
        b["widths"] = CNN_WIDTHS[budget]
        extra = dict(arch="cnn", base_width=CNN_BASE_WIDTH[budget])
        if budget == "small":  # the CNN costs ~20x the MLP per image: fewer images, seeds and LRs
            b.update(train_subset=2000, test_subset=1000, seeds=[0, 1], lrs=[2.0 ** k for k in range(-6, 2)])
    specs = [dict(spec, **extra) for spec in TRANSFER[name][1]] + [dict(BASELINE, **extra)]
    return [dict(spec, optimizer="sgd", dataset="fashion-mnist", batch_size=128, **b) for spec in specs]


def run(name: str, budget: str = "small", out_dir: str = "runs/reproduce", device: str = "cpu", data_dir=None,
        workers: int | None = None, json_mode: bool = False, compile: str = "off", dtype: str | None = None) -> dict:
    """One experiment into ``out_dir/name`` (``compile``: TrainConfig.compile for the sweeps' tasks; ``dtype``: the
    cells' dtype instead of the experiment's float32, e.g. tf32 on a GPU: cells of their own in the store)."""
    check_choice("experiment", name, NAMES)
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'; choose small or paper")
    from ..config import DTYPES, check_device
    if dtype is not None:
        check_choice("dtype", dtype, DTYPES)
    if name in ANALYSES and ((device or "cpu") != "cpu" or dtype is not None):
        what = f"--device {device}" if (device or "cpu") != "cpu" else f"--dtype {dtype}"
        raise ConfigError(f"{name} runs on the CPU only (float64 analyses): drop {what}")
    device = check_device(device or "cpu")
    tiny = budget == "tiny"
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, file=sys.stderr)) if json_mode else print
    t0 = time.perf_counter()
    how = dict(device=device, data_dir=data_dir, workers=workers, compile=compile, label=f"reproduce {name}",
               cells={} if dtype is None else {"dtype": dtype})
    if name in TRANSFER:
        res = _transfer(name, budget, out, how, say)
    elif name == "depth":
        from .depth import run_depth
        res = run_depth(budget, out, how, say)
    elif name == "fig3":
        res = _fig3(budget, out, data_dir, say)
    elif name == "fig8":
        res = _fig8(budget, out, data_dir, say)
    else:
        res = _table1(budget, out, data_dir, say)
    if tiny:
        res["note"] = "tiny budget: a smoke run of the code path, not a result"
    res.update(name=name, budget=budget, seconds=time.perf_counter() - t0,
               command=f"mulocal reproduce {name} --budget {budget}" + (f" --device {device}" if device != "cpu" else "")
                       + _run_flags("off" if name in ANALYSES else compile, dtype))
    (out / f"{name}.json").write_text(json.dumps(json_safe(res), indent=1))
    if name in ANALYSES:  # the numbers live in a store too, so `mulocal report --store` shows every experiment
        from ..sweep.store import Store
        with Store(out / "results.sqlite") as st:
            st.put_result(name, json_safe(res))
        res["store"] = str(out / "results.sqlite")
        res["report_command"] = f"mulocal report --store {res['store']}"
    say(f"{name}: {res['seconds']:.0f} s; figure {res.get('figure')}")
    return res


def run_all(budget: str = "small", out_dir: str = "runs/reproduce", device: str = "cpu", data_dir=None,
            workers: int | None = None, json_mode: bool = False, names=NAMES, compile: str = "off",
            dtype: str | None = None) -> dict:
    """``mulocal reproduce all``: every experiment in turn (the analyses on the CPU whatever ``device``), each
    into its own folder as ``run`` writes it; one that fails is recorded with its error line and the others
    still run. Writes ``OUT/summary.json`` and prints a table: experiment, seconds, verdicts or status."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'; choose small or paper")
    say = (lambda *a: print(*a, file=sys.stderr)) if json_mode else print
    t0, rows = time.perf_counter(), []
    for name in names:
        dev = "cpu" if name in ANALYSES else device
        say(f"== reproduce {name} --budget {budget} --device {dev}")
        try:
            res = run(name, budget, out_dir, dev, data_dir, workers, json_mode=json_mode,
                      compile="off" if name in ANALYSES else compile, dtype=None if name in ANALYSES else dtype)
        except MulocalError as e:
            rows.append({"name": name, "status": "failed", "error": str(e)})
            say(f"{name}: failed: {e}")
            continue
        verdicts = [f"{v['label']}: {v['test_accuracy']['verdict']} (acc) / {v['train_loss']['verdict']} (loss)"
                    for v in res.get("verdicts", [])]
        rows.append({"name": name, "status": "done", "seconds": res["seconds"], "figure": res.get("figure"),
                     "verdicts": verdicts, "json": str(Path(out_dir) / name / f"{name}.json")})
    out = {"budget": budget, "device": device, "seconds": time.perf_counter() - t0, "experiments": rows,
           "command": f"mulocal reproduce all --budget {budget} --device {device}" + _run_flags(compile, dtype)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "summary.json").write_text(json.dumps(json_safe(out), indent=1))
    say(f"{'experiment':<12}{'seconds':>9}  result")
    for r in rows:
        what = r.get("error") if r["status"] == "failed" else ("; ".join(r["verdicts"]) or "done")
        say(f"{r['name']:<12}{r.get('seconds', float('nan')):>9.0f}  {what}")
    say(f"all: {out['seconds']:.0f} s; summary {Path(out_dir) / 'summary.json'}")
    return out


# ------------------------------------------------------------------------------------ transfer
def _is_baseline(fam: dict) -> bool:
    return bool((fam.get("algo_options") or {}).get("readout_only"))


def _run_flags(compile: str, dtype: str | None) -> str:
    """The --compile and --dtype flags of a reproduce command (none at their defaults)."""
    return (f" --compile {compile}" if compile != "off" else "") + (f" --dtype {dtype}" if dtype is not None else "")


def _transfer(name, budget, out, how: dict, say) -> dict:
    from ..plots import transfer_figure
    from ..sweep.table import best_accuracy, format_table
    from ..sweep.transfer import analyze
    from ..sweep.verdict import verdicts

    store = out / "results.sqlite"
    rows, specs, notes = sweep_until_bracketed(_specs(name, budget), store, how, say)
    reports = {m: analyze(rows, metric=m) for m in ("train_loss", "test_accuracy")}
    base = [f for f in reports["test_accuracy"]["families"] if _is_baseline(f["family"])]
    baseline = best_accuracy(base[0]) if base else {}
    shown = {m: dict(r, families=[f for f in r["families"] if not _is_baseline(f["family"])])
             for m, r in reports.items()}
    title = TRANSFER[name][0]
    b = specs[0]
    sub = f"{b['train_subset'] or 'all'} training samples, {b['epochs']} epoch(s), {len(b['seeds'])} seeds, " \
          f"widths {b['widths']}"
    fig = transfer_figure(shown["train_loss"], out / f"{name}.png", f"{title}\n({budget} budget: {sub})",
                          other=shown["test_accuracy"], baseline=baseline)
    say(format_table(reports["train_loss"], reports["test_accuracy"]))
    acc_t = {f["label"]: f["transfer"] for f in reports["test_accuracy"]["families"]}
    fams = []
    for f in reports["train_loss"]["families"]:
        accs = best_accuracy(f)
        fams.append(dict(family_entry(f, acc_t), baseline=_is_baseline(f["family"]),
                         over_baseline={str(w): (None if a is None or baseline.get(w) is None else a - baseline[w])
                                        for w, a in accs.items()}))
    pairs = verdicts(shown["test_accuracy"], shown["train_loss"])
    say_verdicts(pairs, say)
    res = {"title": title, "store": str(store), "figure": fig, "families": fams, "verdicts": pairs,
           "baseline_accuracy": {str(w): a for w, a in baseline.items()}, "grid_notes": notes,
           "lrs": {s.get("algo") if isinstance(s.get("algo"), str) else ",".join(s["algo"]): s["lrs"] for s in specs},
           "report_command": f"mulocal report --store {store}"}
    if name == "fig7":
        res["feature_learning"] = _fig7_features(budget, out, how["data_dir"], say, reports["train_loss"])
    return res


# fig7's feature-learning check: the rules of fig7 under b_L = 1/2 and b_L = 1, BP's muP as the aligned reference
FIG7_FEATURE_CONFIGS = [("dtp", "mup", {}), ("dtp", "mup-bL1", {}), ("tp", "mup", {"feedback": "ridge"}),
                        ("tp", "mup-bL1", {"feedback": "ridge"}), ("bp", "mup", {})]


def _fig7_features(budget, out, data_dir, say, report) -> dict:
    """What tells b_L = 1/2 from b_L = 1 in training: per width, after ``steps`` SGD steps at each
    configuration's best LR at the smallest width (BP: 0.2), the output change caused by the hidden features
    moving, rms(W_L(t) Delta h_{L-1}(t)) (``diagnostics.features``), its share of the output's change and each
    hidden layer's relative feature change; width slopes with their replica standard errors."""
    from ..algos import make_algo
    from ..data import load_dataset
    from ..diagnostics.coord import coord_batches
    from ..diagnostics.features import feature_learning
    from ..nets import build
    from ..param import preset
    from ..figures import features_figure
    widths = ANALYSIS_WIDTHS[budget]
    steps = {"small": 20, "paper": 100, "tiny": 2}[budget]
    data = load_dataset("fashion-mnist", data_dir)
    batches, probe = coord_batches(data, steps, 64, seed=0)
    base_lr = {}
    for f in report["families"]:
        fam = f["family"]
        if _is_baseline(fam):
            continue
        if f["best"] and f["best"][0]["best_lr"] is not None:
            base_lr[(fam["algo"], fam["param"])] = f["best"][0]["best_lr"]
    results = {}
    for algo, pname, opts in FIG7_FEATURE_CONFIGS:
        p = preset(pname, "sgd", algo=algo)
        lr = base_lr.get((algo, pname), 0.2)
        res = feature_learning(lambda w: build("mlp", data.input_shape, 10, w, p, K=3, seeds=range(3)),
                               make_algo(algo, **opts), widths, batches, probe, lr)
        key = rule_label(algo, p.name, opts)
        results[key] = {"lr": lr, **res.to_dict()}
        say(f"fig7 features: {key} (lr {lr:.3g}): width slope of rms(W_L dh) after step 1 "
            f"{res.slopes_per_step['feat'][0]:+.2f}, after step {steps} {res.slopes['feat']:+.2f} ± "
            f"{res.slope_se['feat']:.2f}; of rms(W_L(0) dh) / rms(df) {res.slopes['share_init']:+.2f}; "
            f"of ||dh_(L-1)|| / ||h(0)|| {res.slopes['dh_rel_2']:+.2f}")
    path = features_figure(results, out / "fig7-features.png",
                           f"fig7: feature learning vs width after {steps} SGD steps (FashionMNIST, 3 seeds)")
    summary = {k: {"lr": v["lr"], "feat_step1": v["slopes_per_step"]["feat"][0],
                   **{q: {"slope": v["slopes"][q], "se": v["slope_se"][q]}
                      for q in ("feat", "share", "share_init", "dh_rel_1", "dh_rel_2", "df")}}
               for k, v in results.items()}
    return {"figure": path, "widths": widths, "steps": steps, "summary": summary, "runs": results}


# ------------------------------------------------------------------------------------ analyses
def _fig3(budget, out, data_dir, say) -> dict:
    from ..data import load_dataset
    from ..diagnostics.align import cosine_vs_width
    from ..figures import fig3_figure
    widths = {"small": [64, 128, 256, 512, 1024, 2048], "paper": [64, 128, 256, 512, 1024, 2048, 4096],
              "tiny": [16, 32]}[budget]
    data = load_dataset("fashion-mnist", data_dir, train_subset=1000, seed=0)
    x, y = data.x_train[:32].double().flatten(1), data.y_train[:32]
    from ..progress import Work, net_cost
    panels = {}
    plan = [(act, g, widths if act == "linear" or budget != "small" else widths[:-1])
            for act in ("linear", "tanh") for g in (0.0, -1.0)]
    with Work("reproduce fig3", [sum(net_cost(w) for w in ws) for _, _, ws in plan]) as work:
        for act, g, ws in plan:
            work.start(sum(net_cost(w) for w in ws), f"{act}, gbar_L = {g:g}")
            say(f"fig3: {act}, gbar_L = {g:g}")
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


# the same TP variants as fig7: TP with the ridge feedback of the paper's theory, DTP with trainable feedback
FIG8_CONFIGS = [("bp", "mup", {}), ("tp", "mup", {"feedback": "ridge"}), ("dtp", "mup", {})]


def _fig8(budget, out, data_dir, say) -> dict:
    from ..data import load_dataset
    from ..diagnostics.align import alignment_vs_step
    from ..diagnostics.coord import coord_batches
    from ..figures import fig8_figure
    widths = ANALYSIS_WIDTHS[budget]
    steps = {"small": 20, "paper": 100, "tiny": 2}[budget]
    data = load_dataset("fashion-mnist", data_dir)
    from ..progress import Work
    runs = {}
    with Work("reproduce fig8", [1.0] * 3) as work:
        for seed in (0, 1, 2):
            work.start(1.0, f"seed {seed}")
            batches, probe = coord_batches(data, steps, 64, seed=seed)
            runs[seed] = alignment_vs_step(FIG8_CONFIGS, widths, batches, probe, lr=0.1, K=4)
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
    from ..figures import table1_figure
    widths = ANALYSIS_WIDTHS[budget]
    data = load_dataset("fashion-mnist", data_dir)
    batches, probe = coord_batches(data, 1, 64, seed=0)
    from ..progress import Work
    rows = []
    configs = TABLE1[:1] if budget == "tiny" else TABLE1
    with Work("reproduce table1", [1.0] * len(configs)) as work:
        for algo, opt, g in configs:
            work.start(1.0, f"{algo} {opt} gbar {g:+g}")
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


