"""Sweeps: spec expansion, the resumable store, batching/executor equivalence, kill -9 and restart,
the best-LR estimator and transfer metrics, corrupt stores, the command line."""
import argparse
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mulocal.cli.sweeps import register as register_cli
from mulocal.config import config_hash
from mulocal.sweep.table import format_table
from mulocal.sweep.transfer import analyze, best_of_curve, mean_curve
from mulocal.errors import ConfigError, MulocalError
from mulocal.sweep.schema import StoreError
from mulocal.sweep.store import Store
from mulocal.sweep import expand, load_spec_file, plan, run_sweep

TINY = dict(dataset="synthetic", train_subset=256, test_subset=128, epochs=1, batch_size=64)
METRICS = ("train_loss", "test_loss", "test_accuracy")
LOCAL = dict(workers=0, threads=1, progress=False)  # in this process; one thread: tiny models, steady timings


def _metrics(store_path) -> dict:
    with Store(store_path, create=False) as st:
        return {r["hash"]: r for r in st.rows()}


def _assert_same_results(a: dict, b: dict, rtol: float):
    """The same cells with the same statuses and metrics, these within ``rtol`` relative (0: bitwise, for runs
    on the same shapes; tests/tolerances.py otherwise)."""
    assert set(a) == set(b)
    for h in a:
        ra, rb = a[h], b[h]
        assert ra["status"] == rb["status"], (ra["config"], ra["status"], rb["status"])
        assert ra["epochs_run"] == rb["epochs_run"]
        for k in METRICS:
            va, vb = ra[k], rb[k]
            if va is None or vb is None or math.isinf(va) or math.isinf(vb):
                assert va == vb, (k, va, vb)
            else:
                assert va == vb or abs(va - vb) <= rtol * max(abs(va), abs(vb)), \
                    (k, ra["config"]["width"], ra["lr"], ra["seed"], va, vb, rtol)


def _cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register_cli(sub)
    args = parser.parse_args(argv)
    out = args.func(args)
    return out[0] if isinstance(out, tuple) else out  # (result, exit status)


# ----------------------------------------------------------------------------------------- specs
def test_expand_cross_product_and_stable_hashes():
    spec = dict(algo=["bp", "pc"], param=["mup", "sp"], widths=[16, 32], lrs=[0.1, 0.2, 0.1], seeds=[0, 1],
                algo_options={"pc": {"T": [1, 2]}}, **TINY)
    cells = expand(spec)
    # bp: 2 params x 2 widths x 2 lrs x 2 seeds; pc: the same x 2 values of T (repeated lr dropped)
    assert len(cells) == 16 + 32
    assert len({config_hash(c) for c in cells}) == len(cells)
    assert {c["algo_options"].get("T") for c in cells if c["algo"] == "pc"} == {1, 2}
    assert all(c["algo_options"] == {} for c in cells if c["algo"] == "bp")
    # the same sweep written differently (ints for floats, scalars for lists) gives the same cells
    again = expand(dict(algo=["bp", "pc"], param=["mup", "sp"], widths=[16.0, 32], lrs=[0.1, 0.2], seeds=[0, 1],
                        algo_options={"pc": {"T": [1, 2]}}, dataset="synthetic", train_subset=256.0,
                        test_subset=128, epochs=[1], batch_size=64))
    assert sorted(map(config_hash, again)) == sorted(map(config_hash, cells))
    with pytest.raises(ConfigError, match="unknown sweep key 'widht'"):
        expand(dict(widht=[16], lrs=[0.1]))
    with pytest.raises(ConfigError, match="needs lrs"):
        expand(dict(widths=[16]))
    with pytest.raises(ConfigError, match="positive"):
        expand(dict(widths=[16], lrs=[-0.1]))


def test_toml_spec_with_cli_overrides(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[sweep]\nalgo = "bp"\nparam = ["mup", "sp"]\nwidths = [16, 32]\nlrs = [0.1, 0.4]\n'
                    'seeds = [0, 1]\ndataset = "synthetic"\ntrain_subset = 256\ntest_subset = 128\n'
                    'batch_size = 64\n[run]\nworkers = 0\nthreads = 1\n')
    sweep, run = load_spec_file(spec)
    assert run == {"workers": 0, "threads": 1} and sweep["param"] == ["mup", "sp"]
    out = _cli(["sweep", "--spec", str(spec), "--store", str(tmp_path / "r.sqlite"), "--param", "mup",
                "--no-progress", "--json"])
    assert out["cells"] == 8 and out["done"] + out["diverged"] == 8 and out["executor"] == "inline"
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep]\nwidths = [16,\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        _cli(["sweep", "--spec", str(bad), "--store", str(tmp_path / "x.sqlite")])


# ----------------------------------------------------------------------------------------- store
def test_resume_runs_only_missing_cells_and_is_idempotent(tmp_path):
    store = tmp_path / "runs.sqlite"
    small = dict(widths=[16], lrs=[0.1, 0.4], seeds=[0], **TINY)
    s1 = run_sweep(small, store, **LOCAL)
    assert (s1["new"], s1["ran"]) == (2, 2)
    big = dict(small, widths=[16, 32], seeds=[0, 1])
    s2 = run_sweep(big, store, **LOCAL)
    assert (s2["new"], s2["finished_before"], s2["ran"]) == (6, 2, 6) and s2["complete"]
    s3 = run_sweep(big, store, **LOCAL)
    assert (s3["new"], s3["ran"]) == (0, 0)
    with Store(store, create=False) as st:
        rows = st.rows()
        assert len(rows) == 8 and len({r["hash"] for r in rows}) == 8
        assert all(r["status"] == "done" and r["attempts"] == 1 and r["version"] for r in rows)
        assert all(len(r["history"]) == 1 and r["history"][0]["epoch"] == 1 for r in rows)
        n = st.export_csv(tmp_path / "runs.csv")
    text = (tmp_path / "runs.csv").read_text().splitlines()
    assert n == 8 and len(text) == 9 and text[0].startswith("hash,status,")


def test_diverged_cells_are_results_and_are_not_rerun(tmp_path):
    """A diverged cell is finished: a resumed sweep runs nothing again (only failed cells are retried)."""
    store = tmp_path / "runs.sqlite"
    spec = dict(widths=[16], lrs=[0.1, 1e6], seeds=[0], **TINY)
    s1 = run_sweep(spec, store, **LOCAL)
    assert (s1["done"], s1["diverged"]) == (1, 1)
    s2 = run_sweep(spec, store, **LOCAL)
    assert (s2["ran"], s2["finished_before"]) == (0, 2)
    assert s2["to_run"] == 0 and s2["skipped_claimed_elsewhere"] == 0  # not even planned again


def test_stale_running_cells_are_taken_over(tmp_path):
    """Cells claimed by a runner that is gone (dead pid) go back to pending and run."""
    store = tmp_path / "runs.sqlite"
    spec = dict(widths=[16], lrs=[0.1, 0.4], **TINY)
    with Store(store) as st:
        st.add_cells(expand(spec))
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        import socket
        hashes = [config_hash(c) for c in expand(spec)]
        assert st.claim(hashes, owner=f"{socket.gethostname()}:{dead.pid}") == hashes
        assert st.counts()["running"] == 2
    s = run_sweep(spec, store, **LOCAL)
    assert s["reset_running"] == 2 and s["ran"] == 2 and s["complete"]


def test_failed_cells_are_recorded_and_retried(tmp_path):
    """An error inside a worker marks its cells failed (with the message) and the next sweep tries again."""
    store = tmp_path / "runs.sqlite"
    spec = dict(widths=[8], lrs=[0.1], arch="cnn", **TINY)  # a CNN on 1-D synthetic inputs cannot be built
    s = run_sweep(spec, store, **LOCAL)
    assert s["failed"] == 1 and "image inputs" in s["errors"][0] and not s["complete"]
    s = run_sweep(spec, store, **LOCAL)
    assert s["ran"] == 1 and s["failed"] == 1
    with Store(store, create=False) as st:
        (row,) = st.rows()
    assert row["status"] == "failed" and row["attempts"] == 2 and "image inputs" in row["error"]


# ----------------------------------------------------------------------------------------- equivalence
def test_replica_batching_equals_one_cell_at_a_time(tmp_path):
    """K cells in one batched model give the numbers of K separate runs, diverged cells included; to float64
    rounding (K = 6 and K = 1 are other shapes, which may take other kernels): 2 epochs x 4 steps of a depth-3
    net whose longest sums have 64 terms (the batch)."""
    from tolerances import chain_rtol, train_ops
    spec = dict(param=["mup", "sp"], widths=[16, 32], lrs=[0.05, 0.3, 1e6], seeds=[0, 1], loss="mse", epochs=2,
                dtype="float64", **{k: v for k, v in TINY.items() if k != "epochs"})
    a, b = tmp_path / "batched.sqlite", tmp_path / "single.sqlite"
    sa = run_sweep(spec, a, **LOCAL)
    sb = run_sweep(spec, b, max_replicas=1, **LOCAL)
    assert sa["tasks"] == 4 and sb["tasks"] == 24
    assert sa["diverged"] == sb["diverged"] > 0
    ra, rb = _metrics(a), _metrics(b)
    assert {r["replicas"] for r in ra.values()} == {6} and {r["replicas"] for r in rb.values()} == {1}
    _assert_same_results(ra, rb, chain_rtol(torch.float64, train_ops(2 * 4, 3, 64)))
    # the memory budget splits groups too
    cells = expand(spec)
    tasks = plan(cells, {("synthetic", 256, 128, 0): ((32,), 10, 256)}, max_replicas=64, memory_budget=1)
    assert len(tasks) == len(cells)


def test_sigkill_mid_sweep_then_restart_completes_with_same_results(tmp_path):
    """kill -9 of the runner (process pool, one cell per task), restart: one row per cell, no cell lost or run
    twice past the kill, and bitwise the numbers of an uninterrupted (in-process) run: one cell per task and one
    thread throughout, so every cell runs on the same shapes with the same kernels (batched vs not:
    test_replica_batching_equals_one_cell_at_a_time)."""
    killed, ref = tmp_path / "killed.sqlite", tmp_path / "ref.sqlite"
    axes = ["--widths", "16,32,48", "--lrs", "0.05,0.1,0.2,0.4", "--seeds", "0,1", "--dataset", "synthetic",
            "--train-subset", "2048", "--test-subset", "128", "--epochs", "3", "--batch-size", "32"]
    cmd = [sys.executable, "-m", "mulocal", "sweep", *axes, "--store", str(killed), "--workers", "1",
           "--threads", "1", "--max-replicas", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_at_kill = 0
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if killed.exists():
                try:
                    with sqlite3.connect(str(killed), timeout=5) as db:
                        done_at_kill = db.execute("SELECT COUNT(*) FROM cells WHERE status = 'done'").fetchone()[0]
                except sqlite3.Error:
                    done_at_kill = 0
                if done_at_kill >= 3:
                    break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 3 <= done_at_kill < 24, done_at_kill
    with Store(killed, create=False) as st:
        before = st.counts()
        finished = {r["hash"]: r["finished"] for r in st.rows(status="done")}
    assert sum(before.values()) == 24 and before["done"] < 24
    spec = dict(widths=[16, 32, 48], lrs=[0.05, 0.1, 0.2, 0.4], seeds=[0, 1], dataset="synthetic", train_subset=2048,
                test_subset=128, epochs=3, batch_size=32)
    s = run_sweep(spec, killed, max_replicas=1, **LOCAL)
    assert s["new"] == 0 and s["reset_running"] == before["running"]
    assert s["finished_before"] == before["done"] and s["ran"] == 24 - before["done"] and s["complete"]
    run_sweep(spec, ref, max_replicas=1, **LOCAL)
    rk, rr = _metrics(killed), _metrics(ref)
    assert len(rk) == 24 and all(r["status"] == "done" for r in rk.values())
    assert all(rk[h]["finished"] == t and rk[h]["attempts"] == 1 for h, t in finished.items())  # not run again
    assert sum(r["attempts"] for r in rk.values()) == 24 + before["running"]
    _assert_same_results(rk, rr, 0.0)


@pytest.mark.slow  # CI runs the cluster test (tests/test_ray.py); this one starts its own local Ray instance
def test_ray_executor_matches_local(tmp_path):
    pytest.importorskip("ray")
    spec = dict(param=["mup", "sp"], widths=[16, 32], lrs=[0.1, 0.4], seeds=[0, 1], **TINY)
    a, b = tmp_path / "ray.sqlite", tmp_path / "local.sqlite"
    sa = run_sweep(spec, a, executor="ray", workers=2, max_replicas=2, progress=False)
    assert sa["executor"] == "ray" and sa["complete"] and sa["failed"] == 0, sa["errors"]
    run_sweep(spec, b, **LOCAL)
    # other batch shapes (K <= 2 vs 4) and thread counts: float32 rounding of 4 steps of a depth-3 net whose
    # longest sums have 64 terms (tests/tolerances.py)
    from tolerances import chain_rtol, train_ops
    _assert_same_results(_metrics(a), _metrics(b), chain_rtol(torch.float32, train_ops(4, 3, 64)))


def test_ray_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MulocalError, match=r"pip install 'mulocal\[ray\]'"):
        run_sweep(dict(widths=[16], lrs=[0.1], **TINY), tmp_path / "r.sqlite", executor="ray", progress=False)


# ----------------------------------------------------------------------------------------- analysis
def _fake_rows(widths, lrs, seeds, x_star, curvature=0.05, noise=0.002, diverge_above=2.5, rng_seed=0):
    """Store-like rows of a loss 0.3 + curvature (log2 lr - x*(w))^2 + seed noise; diverged far right."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    base = dict(algo="bp", param="mup", optimizer="sgd", dataset="synthetic")
    for w in widths:
        for lr in lrs:
            for s in seeds:
                x = math.log2(lr)
                div = x > x_star(w) + diverge_above
                loss = math.inf if div else 0.3 + curvature * (x - x_star(w)) ** 2 + noise * rng.standard_normal()
                rows.append({"config": {**base, "width": w, "lr": lr, "seed": s}, "width": w, "lr": lr, "seed": s,
                             "status": "diverged" if div else "done", "train_loss": loss, "test_loss": loss,
                             "test_accuracy": None if div else 0.8})
    return rows


def test_transfer_slope_recovers_known_optimum():
    widths, lrs, seeds = [64, 128, 256, 512], [2.0 ** k for k in range(-6, 3)], [0, 1, 2, 3]
    x_star = lambda w: -1.3 - 0.5 * math.log2(w / 64)  # noqa: E731  (off-grid optima, slope -1/2)
    rep = analyze(_fake_rows(widths, lrs, seeds, x_star))
    (fam,) = rep["families"]
    for e in fam["best"]:
        assert e["method"] == "quadratic" and not e["at_edge"]
        assert abs(e["log2_best_lr"] - x_star(e["width"])) < 0.05, e
        assert e["log2_std"] is not None and e["log2_std"] < 0.2
    t = fam["transfer"]
    assert abs(t["slope"] - (-0.5)) < 0.03, t
    assert t["slope_err"] is not None and abs(t["slope"] + 0.5) <= 3 * t["slope_err"] + 0.01
    # penalty of the width-64 optimum at width 512: curvature * (1.5 octaves)^2
    assert abs(t["penalty"] - 0.05 * 1.5 ** 2) < 0.01, t
    # a transferring family: slope ~ 0, penalty ~ 0
    flat = analyze(_fake_rows(widths, lrs, seeds, lambda w: -2.4, rng_seed=1))["families"][0]["transfer"]
    assert abs(flat["slope"]) < 0.03 and flat["penalty"] < 0.005
    assert "slope" in format_table(rep)


def test_best_lr_estimator_details():
    x = np.arange(-4.0, 3.0)
    y = np.exp((x - 0.3) ** 2)  # a positive curve (a loss) is fitted as a parabola in log(y)
    b = best_of_curve(x, y)
    assert b["method"] == "quadratic" and b["log"] and abs(b["x"] - 0.3) < 1e-9 and abs(b["value"] - 1) < 1e-9
    signed = (x - 0.3) ** 2 - 1  # not positive: fitted in y itself
    bs = best_of_curve(x, signed)
    assert not bs["log"] and abs(bs["x"] - 0.3) < 1e-9 and abs(bs["value"] + 1) < 1e-9
    # a steep rise past the optimum (as losses have) does not pull the vertex value below the data
    steep = np.array([2.0, 1.5, 1.1, 0.9, 0.95, 3.0, 12.0])
    assert best_of_curve(x, steep)["value"] >= 0.8
    # diverged points (inf) end the fitted window; with no finite point right of the minimum: the grid minimum
    y2 = y.copy()
    y2[6:] = np.inf
    b2 = best_of_curve(x, y2)
    assert b2["method"] == "quadratic" and b2["window"] == [-2.0, 1.0] and abs(b2["x"] - 0.3) < 1e-9
    y2[5:] = np.inf
    b2 = best_of_curve(x, y2)
    assert b2["method"] == "argmin" and not b2["at_edge"] and b2["x"] == 0.0
    # minimum at the edge of the grid: grid argmin, flagged
    b3 = best_of_curve(x, (x - 5.0) ** 2)
    assert b3["method"] == "argmin" and b3["at_edge"] and b3["x"] == 2.0
    # seed means: a diverged seed makes the mean infinite, a missing cell is skipped
    m = mean_curve(np.array([[1.0, np.inf, 2.0], [3.0, 1.0, np.nan]]))
    assert m[0] == 2.0 and math.isinf(m[1]) and m[2] == 2.0
    assert best_of_curve(x, np.full_like(x, np.inf)) is None


# ----------------------------------------------------------------------------------------- bad stores
def test_corrupt_or_foreign_store_gives_clear_error(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"definitely not a database\n" * 200)
    with pytest.raises(StoreError, match="not a readable SQLite database"):
        Store(garbage)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(str(foreign)) as db:
        db.execute("CREATE TABLE songs (title TEXT)")
    with pytest.raises(StoreError, match="not a mulocal sweep store"):
        Store(foreign)
    with pytest.raises(StoreError, match="no sweep store"):
        Store(tmp_path / "missing.sqlite", create=False)
    # a real store cut in half
    cut = tmp_path / "cut.sqlite"
    run_sweep(dict(widths=[16, 32], lrs=[0.1, 0.2, 0.4], seeds=[0, 1, 2], **TINY), cut, **LOCAL)
    data = cut.read_bytes()
    assert len(data) > 8192
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError):
        Store(cut, create=False).rows()
    # through the command line: exit status 2, one line, no traceback
    for path, cmd in ((garbage, "report"), (garbage, "sweep"), (foreign, "sweep"), (cut, "report")):
        for argv in [["report", "--store", str(path)] if cmd == "report" else
                     ["sweep", "--store", str(path), "--widths", "16", "--lrs", "0.1", "--dataset", "synthetic"]]:
            p = subprocess.run([sys.executable, "-m", "mulocal", *argv], capture_output=True, text=True)
            assert p.returncode == 2, (argv, p.stderr)
            err = p.stderr.strip()
            assert err.startswith("mulocal: error:") and "\n" not in err and "Traceback" not in err, err
            assert str(path.name) in err


# ----------------------------------------------------------------------------------------- command line
def test_cli_sweep_report_plot(tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    out = _cli(["sweep", "--store", str(store), "--param", "mup,sp", "--widths", "16,32", "--log2-lrs=-3:1",
                "--seeds", "0,1", "--dataset", "synthetic", "--train-subset", "256", "--test-subset", "128",
                "--batch-size", "64", "--workers", "0", "--threads", "1", "--no-progress"])
    assert out["cells"] == 40 and out["complete"]
    printed = capsys.readouterr().out
    assert "best learning rate per width" in printed and "bp mup sgd" in printed
    rep = _cli(["report", "--store", str(store), "--json", "--csv", str(tmp_path / "c.csv")])
    assert [f["label"] for f in rep["families"]] == ["bp mup sgd", "bp sp sgd"]
    for f in rep["families"]:
        assert f["widths"] == [16, 32] and len(f["curves"][0]["points"]) == 5
        assert f["transfer"]["slope"] is not None
    from mulocal.util import json_safe as _clean
    json.dumps(_clean(rep), allow_nan=False)  # plain JSON types only
    assert rep["csv_rows"] == 40
    res = _cli(["plot", "--store", str(store), "--out", str(tmp_path / "plots"), "--json"])
    assert len(res["plots"]) == 3 and all(Path(p).stat().st_size > 1000 for p in res["plots"])
    with pytest.raises(ConfigError, match="give the store"):
        _cli(["sweep", "--widths", "16", "--lrs", "0.1"])
    with pytest.raises(ConfigError, match="does not take option"):
        _cli(["sweep", "--store", str(store), "--widths", "16", "--lrs", "0.1", "--dataset", "synthetic",
              "--algo-opt", "T=2"])


# ----------------------------------------------------------------------------------------- the demo
def test_demo_plumbing_small(tmp_path, monkeypatch, capsys):
    """run_demo on a tiny FashionMNIST spec: store, plots, table; `report` on its store gives the same numbers;
    a second run trains nothing."""
    from mulocal.experiments import demo
    monkeypatch.setattr(demo, "QUICK", dict(widths=[64, 128], lrs=[0.05, 0.2, 0.8], seeds=[0, 1], epochs=1,
                                            train_subset=512, test_subset=256))
    monkeypatch.setattr(demo, "RULES", ("bp",))
    res = demo.run_demo(str(tmp_path), quick=True, workers=0)
    out = capsys.readouterr().out
    assert "best learning rate per width" in out and "bp mup sgd" in out and "bp sp sgd" in out
    assert res["sweep"]["ran"] == 24 and (tmp_path / "demo.sqlite").exists() and (tmp_path / "demo.json").exists()
    assert all(Path(p).exists() for p in res["plots"]) and len(res["plots"]) == 3
    rep = _cli(["report", "--store", str(tmp_path / "demo.sqlite"), "--json"])
    by_label = {f["label"]: f for f in rep["families"]}
    acc = {f["label"]: f["transfer"] for f in rep["other_metric"]["families"]}
    for r in res["results"]:
        f = by_label[r["label"]]
        assert f["transfer"]["slope"] == r["slope"] and acc[r["label"]]["slope"] == r["test_accuracy"]["slope"]
        assert {str(e["width"]): e["best_lr"] for e in f["best"]} == r["best_lr"]
    assert "penalty(acc)" in out and "by test accuracy" in res["verdict"]
    assert [v["label"] for v in res["verdicts"]] == ["bp mup sgd"] and "test_accuracy" in res["verdicts"][0]
    again = demo.run_demo(str(tmp_path), quick=True, workers=0, json_mode=True)
    assert again["sweep"]["ran"] == 0 and again["results"] == res["results"]


def test_demo_extends_a_grid_whose_optimum_sits_on_its_edge(tmp_path, monkeypatch):
    """A grid far below BP's optimum (best LR about 0.2): every optimum sits on the grid's high end, so the demo
    extends the grid upwards (two points per round, as reproduce does) and trains and reports the new cells."""
    from mulocal.experiments import demo
    from mulocal.experiments.grids import MAX_EXTEND
    lrs = [2.0 ** -9, 2.0 ** -8, 2.0 ** -7]
    monkeypatch.setattr(demo, "QUICK", dict(widths=[64, 128], lrs=lrs, seeds=[0], epochs=1, train_subset=256,
                                            test_subset=128))
    monkeypatch.setattr(demo, "RULES", ("bp",))
    res = demo.run_demo(str(tmp_path), quick=True, workers=0, json_mode=True)
    assert res["sweep"]["ran"] == 12  # the demo's own grid: 2 params x 2 widths x 3 LRs
    grown = res["extended_lrs"]["bp"]
    assert grown[:3] == lrs and len(grown) > 3 and grown[3:5] == [2.0 ** -6, 2.0 ** -5]
    assert len(grown) <= 3 + 2 * MAX_EXTEND and any("grid extended up" in n for n in res["grid_notes"])
    # the report is over the extended grid: its best LRs lie above the original grid's end
    assert all(v is not None and v > lrs[-1] for r in res["results"] for v in r["best_lr"].values())
    again = demo.run_demo(str(tmp_path), quick=True, workers=0, json_mode=True)
    assert again["sweep"]["ran"] == 0 and again["extended_lrs"] == res["extended_lrs"]
    assert again["results"] == res["results"]


@pytest.mark.slow
def test_quick_demo_shows_transfer(tmp_path):
    """The quick demo (about a minute on 2 cores): under muP the best LR stays put, under SP it moves."""
    from mulocal.experiments.demo import run_demo
    res = run_demo(str(tmp_path), quick=True, json_mode=True)
    slopes = {(r["algo"], r["param"]): r["slope"] for r in res["results"]}
    for algo in {a for a, _ in slopes}:
        assert abs(slopes[(algo, "mup")]) < 0.2, slopes
        assert slopes[(algo, "sp")] < -0.3, slopes


def test_documented_spec_example_loads_and_expands():
    """docs/examples/sweep.toml (the documented spec format) loads and expands to its cross product."""
    spec, run = load_spec_file(Path(__file__).resolve().parents[1] / "docs" / "examples" / "sweep.toml")
    cells = expand(spec)
    # bp: 2 params x 3 widths x 7 lrs x 2 seeds; pc: the same x 2 values of T
    assert len(cells) == 84 + 168
    assert {c["algo_options"].get("T") for c in cells if c["algo"] == "pc"} == {1, 4}
    assert run["store"] == "runs/example.sqlite" and run["workers"] == 2


def test_an_empty_database_being_created_by_another_sweep_is_initialised(tmp_path):
    """Two sweeps starting on a new store at once: the second may find the SQLite file with no tables yet; it
    creates the (idempotent) schema too instead of calling the file foreign."""
    p = tmp_path / "new.sqlite"
    with sqlite3.connect(str(p)) as db:
        db.execute("PRAGMA journal_mode = WAL")
    assert p.stat().st_size > 0
    with Store(p) as st:
        assert st.counts()["pending"] == 0
    with Store(p, create=False) as st:  # and it is a proper store afterwards
        assert st.meta()["format"] == "mulocal-sweep-store"


def test_bootstrap_includes_the_grid_resolution():
    """The best-LR bootstrap resamples seeds and the fit window, and spreads a grid-minimum estimate over its
    grid cell. Closed forms: an exact parabola in log(loss), identical seeds -> every window finds the same
    vertex (spread 0); a minimum at the grid's edge -> uniform over +- half a step (std = step / sqrt(12));
    an asymmetric curve -> windows disagree (spread > 0) although the seeds are identical."""
    import numpy as np
    from mulocal.sweep.transfer import _bootstrap
    x = np.arange(-6.0, 3.0)  # log2 LR, step 1
    rng = np.random.default_rng(0)
    parab = np.exp(0.3 * (x + 1.3) ** 2)
    assert np.nanstd(_bootstrap(x, np.tile(parab, (3, 1)), 400, rng)) < 1e-9
    edge = np.exp(0.3 * (x + 9.0) ** 2)  # increasing over the grid: minimum at its first point
    b = _bootstrap(x, np.tile(edge, (3, 1)), 4000, rng)
    assert abs(np.std(b) - 1 / np.sqrt(12)) < 0.02 and abs(np.mean(b) - x[0]) < 0.03
    d = np.abs(x + 1.3)
    skew = np.exp(np.where(x < -1.3, 0.1 * d ** 1.2, 0.8 * d ** 2.5))
    assert np.std(_bootstrap(x, np.tile(skew, (3, 1)), 400, rng)) > 0.02


def test_verdict_rule_and_pairing():
    """The verdict rule of docs/REPRODUCTION.md on hand-made numbers (the H200 fig1 results): separation is a
    2-sigma gap of the slopes, transfer |slope| <= 0.25; each muP family is paired with the SP family of the
    same rule and options, whatever its gbar_L."""
    from mulocal.sweep.verdict import verdict, verdicts
    assert verdict({"slope": 0.09, "slope_err": 0.06}, {"slope": -0.38, "slope_err": 0.15})["verdict"] == "reproduced"
    v = verdict({"slope": -0.20, "slope_err": 0.11}, {"slope": -0.29, "slope_err": 0.10})
    assert v["verdict"] == "not separated" and abs(v["gap"] - 0.09) < 1e-12 and abs(v["gap_err"] - 0.1486607) < 1e-6
    assert verdict({"slope": -0.40, "slope_err": 0.01}, {"slope": -1.0, "slope_err": 0.01})["verdict"] == "muP slope beyond bound"
    assert verdict({"slope": 0.0, "slope_err": None}, {"slope": -1.0, "slope_err": 0.1})["verdict"] == "no estimate"
    t = lambda s: {"slope": s, "slope_err": 0.05}  # noqa: E731
    fams = [{"label": "pc mup g0", "family": {"algo": "pc", "param": "mup", "gamma_bar_L": 0.0}, "transfer": t(0.0)},
            {"label": "pc mup g1", "family": {"algo": "pc", "param": "mup", "gamma_bar_L": 1.0}, "transfer": t(0.1)},
            {"label": "pc sp", "family": {"algo": "pc", "param": "sp", "gamma_bar_L": 0.0}, "transfer": t(-0.5)},
            {"label": "bp mup", "family": {"algo": "bp", "param": "mup"}, "transfer": t(0.0)}]
    out = verdicts({"metric": "train_loss", "families": fams})
    assert [(v["label"], v["control"], v["train_loss"]["verdict"]) for v in out] == [
        ("pc mup g0", "pc sp", "reproduced"), ("pc mup g1", "pc sp", "reproduced")]


def test_gpu_sweeps_pack_each_width_into_one_task(monkeypatch):
    """On a GPU a sweep runs one task per GPU with the GPU's free memory as the budget, so a width's LRs x seeds
    train as one batched model; on the CPU with 4 workers the same groups are halved to keep 4 processes busy."""
    import importlib
    P = importlib.import_module("mulocal.sweep.plan")  # the module (the package exports its function plan)
    R = importlib.import_module("mulocal.sweep.runner")
    monkeypatch.setattr(P, "gpu_free_bytes", lambda device="cuda": 100 << 30)
    monkeypatch.setattr(P, "gpu_count", lambda: 1)
    monkeypatch.setattr(R, "gpu_count", lambda: 1)
    gpu, cpu = R.SweepOptions(device="cuda"), R.SweepOptions(device="cpu", workers=4)
    assert gpu.capacity() == 1 and gpu.budget == int(P.GPU_FRACTION * (100 << 30))
    assert cpu.capacity() == 4 and cpu.budget is None
    assert R.SweepOptions(device="cuda", workers=3).capacity() == 3  # an explicit --workers wins
    spec = dict(widths=[64, 512], lrs=[2.0 ** k for k in range(-6, 6)], seeds=[0, 1, 2], **TINY)
    cells = expand(spec)
    shapes = {("synthetic", 256, 128, 0): ((32,), 10, 256)}
    on_gpu = plan(cells, shapes, gpu.max_replicas, gpu.budget, gpu.capacity())
    assert sorted(len(t["cells"]) for t in on_gpu) == [36, 36]
    on_cpu = plan(cells, shapes, cpu.max_replicas, cpu.budget, cpu.capacity())
    wide = [t for t in on_cpu if t["config"]["width"] == 512]  # the costly group is halved for the 4 workers
    assert len(on_cpu) >= 4 and len(wide) >= 2 and all(len(t["cells"]) < 36 for t in wide)
