"""`mulocal reproduce`: the experiments run end to end (tiny budget) and keep their raw results."""
import json
import subprocess
import sys
from pathlib import Path


from mulocal.cli import main


def test_transfer_experiment_tiny(tmp_path, capsys):
    rc = main(["reproduce", "fig1-left", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rules = [f for f in out["families"] if not f["baseline"]]
    assert {f["family"]["param"] for f in rules} == {"mup", "sp"}
    base = [f for f in out["families"] if f["baseline"]]
    assert len(base) == 1 and base[0]["family"]["algo_options"] == {"readout_only": True}
    assert set(out["baseline_accuracy"]) == {"16", "32"}
    # both metrics per family, the verdict of muP against its SP control by both
    assert all(set(f["train_loss"]) >= {"slope", "slope_err", "penalty"} and "slope" in f["test_accuracy"]
               for f in rules)
    assert len(out["verdicts"]) == 1 and {"test_accuracy", "train_loss"} <= set(out["verdicts"][0])
    # the tiny grid (2 LRs) has its minima on its ends: it is extended, two points per round and end
    assert out["grid_notes"] and all(len(v) > 2 for v in out["lrs"].values())
    assert (tmp_path / "fig1-left" / "fig1-left.png").stat().st_size > 5000
    # the raw results are in a store that `mulocal report` reads: every cell finished
    assert main(["report", "--store", out["store"], "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    n = sum(rep["cells"].values())
    assert n >= 2 * 2 * 2 * 3 + 2 * 2 * 3 and rep["cells"]["done"] + rep["cells"]["diverged"] == n


def test_fig8_tiny(tmp_path, capsys):
    assert main(["reproduce", "fig8", "--budget", "tiny", "--out", str(tmp_path), "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert "reproduce fig8: seed 2" in cap.err  # the analysis shows a labelled bar on stderr (stdout: the JSON)
    assert set(out["omega_L"]) == {"bp mup-sgd", "tp mup-tp-sgd feedback=ridge", "dtp mup-dtp-sgd"}
    # the numbers are kept in a store that `mulocal report` reads
    assert main(["report", "--store", out["store"], "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["results"]["fig8"]["summary"] == out["summary"]


def test_unknown_experiment_is_one_line():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "mulocal.cli", "reproduce", "fig99"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown experiment 'fig99'" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_fig7_tiny_has_the_bL1_control_the_baseline_and_the_feature_check(tmp_path, capsys):
    assert main(["reproduce", "fig7", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    params = {(f["family"]["algo"], f["family"]["param"]) for f in out["families"] if not f["baseline"]}
    assert params == {(a, p) for a in ("tp", "dtp") for p in ("mup", "mup-bL1", "sp")}
    assert {(v["label"].split()[0], v["label"].split()[1]) for v in out["verdicts"]} == \
        {(a, p) for a in ("tp", "dtp") for p in ("mup", "mup-bL1")}
    feats = out["feature_learning"]["summary"]
    assert set(feats) == {"dtp mup-dtp-sgd", "dtp mup-bL1-sgd", "tp mup-tp-sgd feedback=ridge",
                          "tp mup-bL1-sgd feedback=ridge", "bp mup-sgd"}
    assert all({"feat_step1", "feat", "share_init", "dh_rel_2"} <= set(v) for v in feats.values())
    assert (tmp_path / "fig7" / "fig7-features.png").stat().st_size > 5000


def test_analyze_features_json(capsys):
    assert main(["analyze", "features", "--algos", "bp,dtp", "--params", "mup,mup-bL1", "--widths", "16,32",
                 "--steps", "2", "--dataset", "synthetic", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["configs"]) == {"bp mup-sgd", "bp mup-bL1-sgd", "dtp mup-dtp-sgd", "dtp mup-bL1-sgd"}
    assert all(c["identity_residual"] < 1e-4 and "dh_rel_2" in c["slopes"] for c in out["configs"].values())


def test_grid_edges_are_told_apart():
    """The grid extension reads which end an optimum sits on: the first grid point -> extend down, the last ->
    up, an interior optimum -> nothing (hand-made reports, both metrics pooled)."""
    from mulocal.experiments.grids import edges as _edges

    def fam(label, best_lr, at_edge):
        pts = [{"lr": v} for v in (0.25, 0.5, 1.0)]
        return {"label": label, "curves": [{"width": 64, "points": pts}],
                "best": [{"width": 64, "best_lr": best_lr, "grid_best_lr": best_lr, "at_edge": at_edge}]}
    loss = {"families": [fam("a", 0.25, True), fam("b", 0.5, False)]}
    acc = {"families": [fam("c", 1.0, True), fam("d", None, None)]}
    assert _edges([loss, acc]) == ({"a"}, {"c"})


def test_depth_transfer_tiny(tmp_path, capsys):
    """`reproduce depth`: BP, PC, DTP on residual MLPs under Depth-muP and the depth-free control, analysed along
    depth (families keep their width and differ in all but depth), each rule paired with its control."""
    assert main(["reproduce", "depth", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["name"] == "depth" and Path(res["figure"]).exists()
    assert {f["family"]["algo"] for f in res["families"]} == {"bp", "pc", "dtp"}
    assert all(set(f["best_lr"]) == {"4", "6"} for f in res["families"])  # per depth
    assert all("depth_alpha=0.0" in v["control"] for v in res["verdicts"])
    assert set(res["accuracy_minus_bp"]) == {"pc", "dtp", "dtp relu", "pc relu"}  # PC at its defaults (error solver)
    assert sum(f["control"] for f in res["families"]) == 6 and len(res["verdicts"]) == 6  # tanh and relu: BP, DTP, PC
    act = res["activity_lr"]  # PC's inference step swept at one weight LR, its best per depth
    assert set(act["train_loss"]["best_kappa"]) == {"4", "6"} and act["kappas"] == [0.5, 0.71, 1.0]
    assert all(0.5 <= k <= 1.0 for k in act["train_loss"]["best_kappa"].values())  # inside the swept grid
    assert set(res["accuracy_minus_bp"]["pc"]) == {"8"}  # per width
    rep = subprocess.run([sys.executable, "-m", "mulocal.cli", "report", "--store", res["store"], "--axis", "depth",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0
    rep = json.loads(rep.stdout)  # the report pairs each family with its depth-free control too
    assert rep["axis"] == "depth" and sorted(v["label"] for v in rep["verdicts"]) == sorted(
        v["label"] for v in res["verdicts"])
    # whatever widths a budget sweeps, the activity-LR sweep stays at its first (one family to analyse)
    from mulocal.experiments.depth import BUDGETS, activity_spec
    for name, b in BUDGETS.items():
        assert activity_spec(name)["widths"] == b["widths"][:1] and activity_spec(name)["depth"] == b["depths"]


def test_reproduce_all_runs_each_and_keeps_going(tmp_path, capsys):
    """`reproduce all`: every experiment in turn, a failing one recorded with its error line (the rest still run),
    one summary file; the analyses run on the CPU whatever --device says."""
    from mulocal.experiments.reproduce import NAMES, run_all
    assert "depth" in NAMES and "fig1-right" in NAMES
    res = run_all("tiny", str(tmp_path), device="cpu", workers=0, names=("no-such-experiment", "fig8"))
    first, second = res["experiments"]
    assert first["status"] == "failed" and "unknown experiment" in first["error"]
    assert second["status"] == "done" and Path(second["json"]).exists()
    assert json.loads((tmp_path / "summary.json").read_text())["experiments"][1]["name"] == "fig8"
    bad = subprocess.run([sys.executable, "-m", "mulocal.cli", "reproduce", "all", "--budget", "huge"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown budget" in bad.stderr and "Traceback" not in bad.stderr


def test_reproduce_passes_compile_to_every_sweep(tmp_path, capsys, monkeypatch):
    """`reproduce --compile MODE`: every sweep of the experiment (the grid extensions, the depth experiment's
    activity sweep) runs its tasks with that mode; the analyses ignore it. (The sweeps here run eagerly: what is
    checked is what they are asked for; the compiled step itself is tests/test_compile.py's.)"""
    import mulocal.sweep as sweep
    real, asked = sweep.run_sweep, []

    def spy(spec, store, options=None, **kw):
        asked.append(kw.get("compile"))
        return real(spec, store, options, **{**kw, "compile": "off"})
    monkeypatch.setattr(sweep, "run_sweep", spy)
    assert main(["reproduce", "depth", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0",
                 "--compile", "default", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(asked) >= 2 and set(asked) == {"default"}  # the transfer sweeps and the activity sweep
    assert out["command"].endswith("--compile default")


def test_reproduce_takes_the_cells_dtype(tmp_path, capsys):
    """--dtype sets every training cell's dtype (cells of their own in the store: float32 ones are not reused); the
    float64 analyses refuse it with one line."""
    import sqlite3
    assert main(["reproduce", "fig1-right", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0", "--dtype",
                 "float64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"].endswith("--dtype float64")
    db = sqlite3.connect(str(tmp_path / "fig1-right" / "results.sqlite"))
    dtypes = [json.loads(c)["dtype"] for (c,) in db.execute("SELECT config FROM cells")]
    db.close()
    assert dtypes and set(dtypes) == {"float64"}
    bad = subprocess.run([sys.executable, "-m", "mulocal.cli", "reproduce", "fig8", "--dtype", "tf32", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "drop --dtype tf32" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
