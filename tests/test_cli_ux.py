"""Command line, as a new user meets it (issue 22): output paths checked and created before the work, no input
accepted without a word, labelled progress with an ETA, help that fits the command, figures that mark what
they say, and --help / --version without loading torch."""
import argparse
import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mulocal.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
SYNTH = ["--dataset", "synthetic"]


def _run(args, **kw):
    p = subprocess.run([sys.executable, "-m", "mulocal", *args], capture_output=True, text=True, timeout=300, **kw)
    return p.returncode, p.stdout, p.stderr


def _one_line(rc, err, needle, code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (rc, err)


# ---------------------------------------------------------------------------- torch only when a command needs it
LOADED = """
import sys
from mulocal.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], [], ["trian"]])
def test_help_version_and_a_mistyped_command_do_not_load_torch(argv):
    p = subprocess.run([sys.executable, "-c", LOADED, *argv], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip().splitlines()[-1] == "[]", (argv, p.stdout[-500:], p.stderr[-500:])


def test_python_dash_m_help_imports_no_torch():
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "mulocal", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "train" in p.stdout
    imported = [line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")]
    assert "mulocal.cli" in imported and not [m for m in imported if m.split(".")[0] == "torch"]


@pytest.mark.parametrize("argv", [["train", "--widht", "3"], ["train", "--algo", "pc", "--inferense", "error"],
                                  ["coord", "--widht", "3"], ["derive", "--widht", "3"], ["describe", "--widht", "3"],
                                  ["analyze", "cosine", "--widht", "3"],
                                  ["eval", "--checkpoint", "c.pt", "--widht", "3"],
                                  ["export", "--checkpoint", "c.pt", "--out", "m.pt", "--widht", "3"], ["sweep", "--widht", "3"],
                                  ["report", "--store", "s.sqlite", "--widht", "3"], ["plot", "--store", "s.sqlite", "--widht", "3"],
                                  ["reproduce", "depth", "--widht", "3"], ["demo", "--widht", "3"]])
def test_a_mistyped_flag_of_a_command_answers_without_torch(argv):
    """A subcommand's flags come from the run fields and the rules' declarations (``algos/declared.py``), both
    torch-free: a mistyped flag is one error line, status 2, before torch would load."""
    script = LOADED.replace("except SystemExit:\n    pass", "except SystemExit as e:\n    print(e.code)") + \
        f"print('mulocal.cli.{COMMANDS[argv[0]][0]}' in sys.modules)\n"
    p = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
    code, loaded, parsed = p.stdout.strip().splitlines()[-3:]
    _one_line(int(code), p.stderr, f"unrecognized arguments: {argv[-2]}")
    assert loaded == "[]" and parsed == "True", (argv, p.stdout[-500:])


# ---------------------------------------------------------------------------- help
def _parsers():
    """(name, parser) of every command and every analyze mode, filled."""
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, p in sub.choices.items():
        p.format_help()  # fills it
        out.append((name, p))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                out += [(f"{name} {n}", q.format_help() and q) for n, q in a.choices.items()]
    return out


def test_every_flag_of_every_command_says_what_it_does():
    parsers = _parsers()
    assert {n.split()[0] for n, _ in parsers} == set(COMMANDS) and len(parsers) == len(COMMANDS) + 5
    missing = [(n, a.option_strings or a.dest) for n, p in parsers for a in p._actions
               if not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction)) and not a.help]
    assert missing == []


def test_an_analyze_mode_lists_its_own_flags_only():
    helps = {n.split()[1]: p.format_help() for n, p in _parsers() if n.startswith("analyze ")}
    assert "--activation" in helps["cosine"] and "--gamma-bars" not in helps["cosine"]
    assert "--arch" not in helps["cosine"] and "--params" not in helps["cosine"] and "--kappa" not in helps["cosine"]
    assert "--gamma-bars" in helps["linear"] and "--dataset" not in helps["linear"] and "--lr " not in helps["linear"]
    assert "--kappa" in helps["layers"] and "--depth" in helps["layers"] and "--depth" not in helps["features"]
    rc, _, err = _run(["analyze", "linear", "--activation", "tanh"])
    _one_line(rc, err, "unrecognized arguments: --activation")


def test_reproduce_names_its_experiments_and_all():
    rc, out, err = _run(["reproduce", "--help"], env={"COLUMNS": "200", "PATH": ""})
    assert rc == 0 and "fig1-left" in out and "table1" in out and "all" in out
    rc, _, err = _run(["reproduce", "fig2"])
    _one_line(rc, err, "unknown experiment 'fig2'; choose one of fig1-left, ")
    assert err.rstrip().endswith("depth, or all (see `mulocal reproduce --help`)")


def test_run_sh_usage_is_its_comment_block():
    p = subprocess.run(["bash", str(ROOT / "run.sh")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "./run.sh demo" in p.stdout and "./run.sh test " in p.stdout
    assert "set -euo" not in p.stdout and "#" not in p.stdout.splitlines()[0]
    assert p.stdout.rstrip().endswith("./run.sh test -k coord).")


# ---------------------------------------------------------------------------- input accepted without a word
@pytest.mark.parametrize("args,needle", [
    (["train", *SYNTH, "--lr", "0"], "must be positive"),
    (["train", *SYNTH, "--lrs", "0.1,,0.2"], "an empty item in '0.1,,0.2'"),
    (["train", *SYNTH, "--seeds", "0,"], "an empty item in '0,'"),
    (["coord", *SYNTH, "--widths", "64,,128"], "an empty item"),
    (["coord", *SYNTH, "--lr", "-1"], "must be positive"),
    (["describe", "--lr", "0"], "must be positive"),
    (["sweep", *SYNTH, "--widths", "8", "--lrs", "0.1,,0.2", "--store", "s.sqlite"], "an empty item"),
    (["sweep", *SYNTH, "--widths", "8", "--algo-opt", "pc.T=1,,2", "--store", "s.sqlite"], "an empty item"),
    (["analyze", "layers", "--lrs", "0.1,0", "--algos", "bp,dtp"], "must be positive"),
    (["train", *SYNTH, "--lrs", "0.1,0.2,0.3", "--seeds", "0,1"], "add --cross"),
])
def test_bad_values_are_refused_in_one_line(args, needle, tmp_path):
    rc, out, err = _run(args, cwd=tmp_path)
    _one_line(rc, err, needle)
    assert not (tmp_path / "s.sqlite").exists()


def test_lrs_and_seeds_are_paired_or_crossed(capsys):
    base = ["train", *SYNTH, "--width", "16", "--epochs", "1", "--no-progress", "--lrs", "0.05,0.2", "--seeds", "0,1"]
    assert main(base + ["--json"]) == 0
    reps = json.loads(capsys.readouterr().out)["replicas"]
    assert [(r["lr"], r["seed"]) for r in reps] == [(0.05, 0), (0.2, 1)]
    assert main(base + ["--cross", "--json"]) == 0
    reps = json.loads(capsys.readouterr().out)["replicas"]
    assert sorted((r["lr"], r["seed"]) for r in reps) == [(0.05, 0), (0.05, 1), (0.2, 0), (0.2, 1)]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "2 replicas, LRs and seeds paired item by item" in out and "lr 0.2 seed 1" in out


def test_a_run_whose_every_replica_diverged_exits_1(capsys):
    base = ["train", *SYNTH, "--width", "16", "--epochs", "1", "--no-progress", "--json"]
    assert main(base + ["--lrs", "1e6,2e6", "--seeds", "0,1"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == ["diverged", "diverged"] and "every replica (2) diverged" in err
    assert main(base + ["--lrs", "0.1,1e6", "--seeds", "0,1"]) == 0  # one diverged, one trained: not a failure
    assert json.loads(capsys.readouterr().out)["status"] == ["done", "diverged"]


# ---------------------------------------------------------------------------- output paths
def test_missing_output_folders_are_created_before_training(tmp_path, capsys):
    ck, metrics = tmp_path / "a" / "b" / "c.pt", tmp_path / "m" / "m.jsonl"
    assert main(["train", *SYNTH, "--width", "16", "--epochs", "1", "--no-progress", "--json",
                 "--checkpoint", str(ck), "--metrics", str(metrics)]) == 0
    assert ck.stat().st_size > 0 and json.loads(metrics.read_text().splitlines()[0])["epoch"] == 1


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """A folder the file system refuses (as under /proc) is one error line, before any net is built."""
    import mulocal.diagnostics.coord as coord
    bad = tmp_path / "x"
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if self == bad:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(self))
        return real(self, *a, **kw)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(coord, "coord_check", lambda *a, **k: pytest.fail("the check ran"))
    assert main(["coord", *SYNTH, "--widths", "16,32", "--steps", "1", "--plot", str(bad / "c.png")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == f"mulocal: error: cannot write {bad / 'c.png'}: No such file or directory: {bad}"


def test_the_table_is_printed_before_the_figure(tmp_path, monkeypatch, capsys):
    """A figure that cannot be written after all (disk full) loses no result: the table is already out."""
    from mulocal.diagnostics.coord import CoordResult

    def full(self, path, title=""):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(CoordResult, "plot", full)
    assert main(["coord", *SYNTH, "--widths", "16,32", "--steps", "1", "--no-progress",
                 "--plot", str(tmp_path / "c.png")]) == 2
    out, err = capsys.readouterr()
    assert "max |slope| over counted quantities" in out and "No space left on device" in err


# ---------------------------------------------------------------------------- what is printed
def _golden_store(tmp_path) -> str:
    store = tmp_path / "store.sqlite"
    store.write_bytes((ROOT / "tests" / "golden" / "store.sqlite").read_bytes())
    return str(store)


@pytest.mark.parametrize("metric,other", [("test_accuracy", "loss"), ("train_loss", "acc")])
def test_report_header_columns_are_apart(tmp_path, capsys, metric, other):
    assert main(["report", "--store", _golden_store(tmp_path), "--metric", metric]) == 0
    head = capsys.readouterr().out.splitlines()[1]
    assert head.split() == ["config", "8", "16", "penalty", "slope", f"penalty({other})", f"slope({other})",
                            "best", "acc"]


def test_sweep_summary_shows_test_accuracy_too(tmp_path, capsys):
    assert main(["sweep", *SYNTH, "--widths", "8,16", "--lrs", "0.1,0.4", "--param", "mup,sp", "--workers", "0",
                 "--no-progress", "--store", str(tmp_path / "s.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "penalty(acc)" in out and "slope(acc)" in out and "by test accuracy:" in out


def test_describe_states_gamma_and_what_the_lr_columns_are(capsys):
    assert main(["describe", "--algo", "pc", "--gamma-bar-L", "-1", "--width", "256"]) == 0
    out = capsys.readouterr().out
    assert "gamma_L = 1 * m^1 = 4" in out and "^--" not in out  # m = 256 / 64
    assert "lr, bias lr: multipliers of the base learning rate" in out
    assert main(["describe", "--gamma-bar-L", "1", "--lr", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "gamma_L = 1 * m^-1 = 0.25" in out and "lr, bias lr: learning rates at base learning rate 0.1" in out


# ---------------------------------------------------------------------------- progress
def test_coord_and_derive_show_a_labelled_bar(capsys):
    assert main(["coord", *SYNTH, "--widths", "16,32", "--steps", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert "coord bp mup-sgd: width 32" in err and "100%" in err
    assert main(["derive", *SYNTH, "--widths", "16,32", "--rounds", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "derive bp (up to 2 coordinate checks): width 16" in err and json.loads(out)["widths"] == [16, 32]
    assert main(["coord", *SYNTH, "--widths", "16,32", "--steps", "1", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_the_sweep_bar_moves_within_a_task_and_says_what_it_counts(tmp_path, monkeypatch, capsys):
    """One task of 4 cells: the bar reports the task's steps as it trains (not 0% until it ends), labelled,
    with its cell count apart from the share of the work."""
    from mulocal.sweep import run_sweep, worker
    monkeypatch.setattr(worker, "REPORT_EVERY", 0.002)
    spec = dict(dataset="synthetic", widths=[64], lrs=[0.05, 0.1], seeds=[0, 1], epochs=3, batch_size=8)
    run_sweep(spec, tmp_path / "s.sqlite", workers=0, label="fig-x (bp mup)")
    err = capsys.readouterr().err
    frames = [f for f in re.split(r"[\r\n]", err) if "of the work" in f]
    assert frames and all(f.startswith("fig-x (bp mup): ") and "| ," not in f for f in frames)
    during = [int(m.group(1)) for f in frames if "0/4 cells" in f for m in [re.search(r"(\d+)% of the work", f)]]
    assert any(0 < p < 100 for p in during), frames
    assert "fig-x (bp mup): 4/4 cells" in frames[-1] and "100% of the work" in frames[-1]


def test_a_task_reports_its_steps_as_it_trains(monkeypatch):
    from mulocal.config import default_cell
    from mulocal.sweep import worker
    monkeypatch.setattr(worker, "REPORT_EVERY", 0.002)
    g = {k: v for k, v in default_cell(dataset="synthetic", width=64, epochs=4, batch_size=8).items()
         if k not in ("lr", "seed")}
    seen = []
    res = worker.run_task({"id": 7, "config": g, "cells": [{"hash": "a", "lr": 0.1, "seed": 0}]},
                          report=lambda i, f: seen.append((i, f)))
    assert res["ok"] and seen and {i for i, _ in seen} == {7}
    fracs = [f for _, f in seen]
    assert fracs == sorted(fracs) and 0 < fracs[0] and fracs[-1] <= 1


# ---------------------------------------------------------------------------- figures
def _fam(label="bp sp sgd"):
    """A family whose fitted optimum value (best_value) lies far below its measured curve, as in the report."""
    pts = lambda ys, accs: [{"lr": lr, "mean": y, "min": y * 0.98, "max": y * 1.02, "n_diverged": 0,
                             "test_accuracy_mean": a, "test_accuracy_min": a - 0.01, "test_accuracy_max": a + 0.01}
                            for lr, y, a in zip([0.25, 0.5, 1.0, 2.0], ys, accs)]
    curves = [{"width": 16, "points": pts([0.9, 0.7, 0.65, 0.8], [0.5, 0.6, 0.7, 0.55])},
              {"width": 32, "points": pts([0.8, 0.66, 0.75, 0.9], [0.6, 0.72, 0.65, 0.5])}]
    best = [{"width": 16, "best_lr": 2 ** -0.25, "best_value": 0.55}, {"width": 32, "best_lr": 0.5, "best_value": 0.5}]
    acc_best = [{"width": 16, "best_lr": 1.0, "best_value": 0.3},
                {"width": 32, "best_lr": 2 ** -0.75, "best_value": 0.2}]
    t = {"slope": None}
    return ({"label": label, "curves": curves, "best": best, "transfer": t},
            {"label": label, "curves": curves, "best": acc_best, "transfer": t})


def _marks(ax):
    stars = [(float(ln.get_xdata()[0]), float(ln.get_ydata()[0]), ln.get_color()) for ln in ax.lines
             if ln.get_marker() == "*"]
    curves = {ln.get_color(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines if ln.get_marker() == "o"}
    vlines = sorted(float(ln.get_xdata()[0]) for ln in ax.lines if ln.get_linestyle() == ":")
    return stars, curves, vlines


def _height(xs, ys, x0, log_y):
    """Where the straight segment drawn on the plot (log2 x; log y on a log axis) passes x0."""
    import numpy as np
    lx = np.log2(xs)
    return float(np.exp(np.interp(np.log2(x0), lx, np.log(ys))) if log_y else np.interp(np.log2(x0), lx, ys))


def test_stars_sit_on_the_curve_and_each_panel_marks_its_own_optimum():
    from mulocal.plots import family_figure
    fam, acc = _fam()
    fig = family_figure(fam, "train_loss", acc)
    (s1, c1, v1), (s2, c2, v2) = _marks(fig.axes[0]), _marks(fig.axes[1])
    assert v1 == sorted(e["best_lr"] for e in fam["best"]) and v2 == sorted(e["best_lr"] for e in acc["best"])
    for stars, curves, log_y in ((s1, c1, True), (s2, c2, False)):
        assert len(stars) == 2
        for x, y, color in stars:
            xs, ys = curves[color]
            assert y == pytest.approx(_height(xs, ys, x, log_y), rel=1e-12)
            assert min(ys) <= y <= max(ys)
    # the loss star at the grid point 0.5 (width 32) is the measured minimum, not the parabola's 0.5 below it
    assert any(x == 0.5 and y == pytest.approx(0.66) for x, y, _ in s1)
    assert all(y > 0.6 for _, y, _ in s1)
    import matplotlib.pyplot as plt
    plt.close(fig)
    fig = family_figure(fam, "train_loss")  # no accuracy report: the accuracy panel marks nothing
    assert _marks(fig.axes[1])[2] == [] and _marks(fig.axes[1])[0] == []
    plt.close(fig)


def test_transfer_figure_marks_accuracy_optima_on_the_accuracy_row(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from mulocal import plots
    fam, acc = _fam()
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    plots.transfer_figure({"metric": "train_loss", "families": [fam]}, tmp_path / "t.png", "a title",
                          other={"metric": "test_accuracy", "families": [acc]})
    monkeypatch.undo()
    top, bottom = figs[0].axes[0], figs[0].axes[1]
    assert _marks(top)[2] == sorted(e["best_lr"] for e in acc["best"])
    assert _marks(bottom)[2] == sorted(e["best_lr"] for e in fam["best"])
    assert (tmp_path / "t.png").stat().st_size > 1000
    plt.close(figs[0])
