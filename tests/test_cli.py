"""Command line: JSON contracts and one clear line on bad input."""
import json
from pathlib import Path
import subprocess
import sys

import pytest

from mulocal.cli import main


def _run(args):
    p = subprocess.run([sys.executable, "-m", "mulocal.cli", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("args,needle", [
    (["train", "--param", "nope", "--dataset", "synthetic"], "unknown parameterization preset 'nope'"),
    (["train", "--width", "0", "--dataset", "synthetic"], "--width must be positive"),
    (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["coord", "--widths", "64,x"], "comma-separated integers"),
    (["train", "--dataset", "synthetic", "--algo", "hebb"], "unknown algorithm 'hebb'"),
    (["train", "--dataset", "synthetic", "--T", "5"], "--T applies to --algo pc only"),
    (["train", "--dataset", "synthetic", "--algo", "pc", "--inference", "sideways"], "unknown inference"),
    (["train", "--dataset", "synthetic", "--algo", "pc", "--T", "0"], "T must be a positive integer"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent-dir", "--no-download"],
     "dataset-fashion-mnist"),
])
def test_bad_input_one_clear_line(args, needle):
    rc, out, err = _run(args)
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err


def test_train_json(capsys):
    rc = main(["train", "--dataset", "synthetic", "--width", "32", "--epochs", "1", "--json", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "done" and 0 <= out["test_accuracy"] <= 1


def test_train_json_replicas(capsys):
    rc = main(["train", "--dataset", "synthetic", "--width", "32", "--lr", "0.05,0.1", "--seeds", "1,2", "--json",
               "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == ["done", "done"] and len(out["test_accuracy"]) == 2


def test_coord_json(capsys, tmp_path):
    png = tmp_path / "c.png"
    rc = main(["coord", "--dataset", "synthetic", "--widths", "32,64,128", "--steps", "2", "--json",
               "--plot", str(png)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["counted"]) <= set(out["slopes"]) and "f" in out["slopes"] and "f" not in out["counted"]
    assert out["max_abs_slope"] == max(abs(out["slopes"][k]) for k in out["counted"])
    assert png.stat().st_size > 1000


def test_describe_and_data_check(capsys):
    assert main(["describe", "--param", "mup", "--width", "512"]) == 0
    assert "m = 8" in capsys.readouterr().out
    assert main(["data", "check", "synthetic", "--json"]) == 0


def test_pc_train_and_coord_json(capsys):
    rc = main(["train", "--algo", "pc", "--dataset", "synthetic", "--width", "32", "--gamma-bar-L", "-1", "--T", "3",
               "--inference", "parallel", "--json", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "done" and out["param"] == "mup-sgd"
    rc = main(["coord", "--algo", "pc", "--dataset", "synthetic", "--widths", "32,64,128", "--steps", "2",
               "--gamma-bar-L", "1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert "pert_2" in out["slopes"] and out["slopes"]["pert_2"] < -1.5


@pytest.mark.parametrize("algo,extra", [("dtp", ["--feedback", "ridge"]), ("tp", ["--fb-loss", "drl"]),
                                        ("gnt", ["--damping", "0.01"])])
def test_target_rules_train_json(capsys, algo, extra):
    rc = main(["train", "--algo", algo, "--dataset", "synthetic", "--width", "32", "--json", "--no-progress", *extra])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "done" and out["param"] == f"mup-{algo}-sgd"


def test_derive_json_keys(capsys):
    rc = main(["derive", "--algo", "bp", "--dataset", "synthetic", "--widths", "32,64,128", "--rounds", "2",
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["b"]) == 3 and len(out["c"]) == 3 and "agrees" in out


@pytest.mark.parametrize("what", ["linear", "alignment"])
def test_analyze_json(capsys, tmp_path, what):
    args = ["analyze", what, "--widths", "32,64,128", "--json", "--plot", str(tmp_path / "a.png")]
    if what == "alignment":
        args += ["--dataset", "synthetic", "--steps", "2", "--algos", "bp,dtp"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert ("norms" in out) if what == "linear" else (len(out["configs"]) == 2)


# ---------------------------------------------------------------------------- failures: one line, right status
def _one_line(rc, err, needle, code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (rc, err)


@pytest.mark.parametrize("argv", [
    ["train", "--dataset", "synthetic", "--metrics", "{bad}/m.jsonl"],
    ["train", "--dataset", "synthetic", "--checkpoint", "{bad}/c.pt"],
    ["coord", "--dataset", "synthetic", "--plot", "{bad}/c.png"],
    ["derive", "--dataset", "synthetic", "--plot", "{bad}/d.png"],
    ["report", "--store", "{store}", "--csv", "{bad}/r.csv"],
    ["plot", "--store", "{store}", "--out", "{bad}/plots"],
    ["reproduce", "fig1-left", "--budget", "tiny", "--out", "{bad}/rep"],
    ["demo", "--quick", "--out", "{bad}/demo"],
    ["sweep", "--dataset", "synthetic", "--widths", "8", "--lrs", "0.1", "--store", "{bad}/s.sqlite"],
])
def test_unwritable_output_is_one_line_before_compute(argv, tmp_path):
    """An output path under a file (not a folder) is refused at parse time, with exit 2."""
    (tmp_path / "afile").write_text("x")
    store = tmp_path / "store.sqlite"  # a copy: reading a store leaves SQLite's side files next to it
    store.write_bytes((Path(__file__).resolve().parent / "golden" / "store.sqlite").read_bytes())
    argv = [a.replace("{bad}", str(tmp_path / "afile")).replace("{store}", str(store)) for a in argv]
    rc, out, err = _run(argv)
    _one_line(rc, err, "is not a folder")


def test_read_only_folder_is_named(tmp_path, monkeypatch, capsys):
    """Writing into a read-only folder is refused naming it; a store in one is still reported (read only)."""
    import os
    import shutil
    store = tmp_path / "ro" / "store.sqlite"
    store.parent.mkdir()
    shutil.copy(Path(__file__).resolve().parent / "golden" / "store.sqlite", store)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == store.parent and mode & os.W_OK
                        else real(p, mode, **kw))
    assert main(["report", "--store", str(store), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["families"]) == 8
    with pytest.raises(SystemExit) as e:
        main(["plot", "--store", str(store), "--out", str(store.parent / "plots")])
    assert e.value.code == 2 and "read-only" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "mps"])
def test_unknown_device_names_the_choices(device):
    rc, out, err = _run(["train", "--dataset", "synthetic", "--device", device])
    _one_line(rc, err, f"unknown device '{device}'; choose cpu or cuda")


def test_a_command_that_ignores_the_device_refuses_it():
    rc, out, err = _run(["reproduce", "fig3", "--device", "cuda"])
    _one_line(rc, err, "fig3 runs on the CPU only")


def test_sweep_with_a_failed_cell_exits_non_zero(tmp_path):
    """A cell whose worker fails (a CNN on flat inputs) is failed, not diverged: the sweep exits 1."""
    rc, out, err = _run(["sweep", "--dataset", "synthetic", "--train-subset", "128", "--test-subset", "64",
                         "--arch", "cnn", "--widths", "4", "--lrs", "0.1", "--workers", "0", "--no-progress",
                         "--store", str(tmp_path / "s.sqlite"), "--json"])
    assert rc == 1, err
    assert json.loads(out)["failed"] == 1


def test_data_check_exits_1_when_not_ok(tmp_path):
    from test_data import make_fake_mnist
    make_fake_mnist(tmp_path)
    assert _run(["data", "check", "fashion-mnist", "--data-dir", str(tmp_path), "--json"])[0] == 0
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    rc, out, err = _run(["data", "check", "fashion-mnist", "--data-dir", str(tmp_path), "--json"])
    assert rc == 1 and json.loads(out)["ok"] is False


def test_report_shows_both_metrics_accuracy_and_flags_families_that_do_not_learn(capsys, tmp_path):
    store = str(tmp_path / "store.sqlite")
    (tmp_path / "store.sqlite").write_bytes((Path(__file__).resolve().parent / "golden" / "store.sqlite").read_bytes())
    assert main(["report", "--store", store]) == 0
    text = capsys.readouterr().out
    assert "penalty(acc)" in text and "slope(acc)" in text and "best acc" in text
    assert text.count("does not learn") == 8 + 1  # 8 families (tiny synthetic runs) + the legend
    assert main(["report", "--store", store, "--learn-floor", "0.05", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert all(f["learns"] for f in rep["families"]) and rep["other_metric"]["metric"] == "test_accuracy"
    assert len(rep["other_metric"]["families"]) == 8


def test_pc_inference_status_is_shown_and_unstable_inference_warned(capsys):
    """train prints each epoch's PC inference status; the old parallel step (1/gamma, energy rises) is warned,
    the default (curvature bound) is not; --json carries the status per replica."""
    base = ["train", "--algo", "pc", "--dataset", "synthetic", "--width", "128", "--T", "5", "--inference",
            "parallel", "--no-progress"]
    assert main(base + ["--parallel-step", "gamma"]) == 0
    out, err = capsys.readouterr()
    assert "[inference: parallel T=5, energy rose" in err and "warning: replica 0: energy rose during inference" in err
    assert "warning: energy rose" in out
    assert main(base + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    inf = res["replicas"][0]["inference"]
    assert inf["energy_rose"] == 0.0 and 0 < inf["residual"] < 1


def test_status_warning_rules():
    from mulocal.algos.pc import RESIDUAL_WARN, status_warning
    assert status_warning(0.0, 0.3) is None and status_warning(float("nan"), 0.5) is None
    assert status_warning(None, None) is None
    assert "energy rose" in status_warning(0.01, 0.3)
    assert "residual" in status_warning(0.0, RESIDUAL_WARN * 1.01)


def test_report_shows_pc_inference_status(capsys, tmp_path):
    """A sweep of PC parallel inference with the unstable step and the default: report flags the first only."""
    store = str(tmp_path / "s.sqlite")
    rc = main(["sweep", "--algo", "pc", "--T", "5", "--inference", "parallel", "--parallel-step", "gamma,bound",
               "--dataset", "synthetic", "--widths", "128", "--lrs", "0.05,0.1", "--workers", "0", "--no-progress",
               "--store", store, "--json"])
    assert rc == 0
    capsys.readouterr()
    assert main(["report", "--store", store]) == 0
    text = capsys.readouterr().out
    assert "PC inference" in text and text.count("WARNING: unstable inference in 2 cells") == 1
    assert text.count("energy never rose") == 1 and text.count("inference!") == 1
    assert main(["report", "--store", store, "--json"]) == 0
    fams = json.loads(capsys.readouterr().out)["families"]
    warned = sorted(f["inference"]["warned_cells"] for f in fams)
    assert warned == [0, 2] and all(f["inference"]["cells"] == 2 for f in fams)


def test_algo_takes_a_list_in_every_command(capsys):
    """--algo A,B runs each rule in turn (options scoped to the rules that declare them)."""
    assert main(["train", "--algo", "bp,pc", "--T", "2", "--dataset", "synthetic", "--width", "32", "--json",
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["algo"] for o in out["algos"]] == ["bp", "pc"] and all(o["status"] == "done" for o in out["algos"])
    assert main(["coord", "--algo", "bp,dtp", "--dataset", "synthetic", "--widths", "32,64", "--steps", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["algo"] for o in out["algos"]] == ["bp", "dtp"]
    assert main(["describe", "--algo", "tp,pc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["parameterization"]["name"] for o in out["algos"]] == ["mup-tp-sgd", "mup-sgd"]
    rc, _, err = _run(["train", "--algo", "bp,dtp", "--T", "2", "--dataset", "synthetic"])
    _one_line(rc, err, "--T applies to --algo pc only")


def test_inference_summary_reads_the_last_epoch_of_finished_cells():
    from mulocal.sweep.transfer import inference_summary
    rows = [{"status": "done", "lr": 0.1, "history": [{"epoch": 1, "pc_energy_rose": 0.5, "pc_residual": 2.0},
                                           {"epoch": 2, "pc_energy_rose": 0.0, "pc_residual": 0.3},
                                           {"event": "resumed"}]},
            {"status": "done", "lr": 2.0, "history": [{"epoch": 1, "pc_energy_rose": 0.25, "pc_residual": 0.5}]},
            {"status": "diverged", "history": [{"epoch": 1, "pc_energy_rose": 1.0, "pc_residual": 9.0}]},
            {"status": "done", "history": [{"epoch": 1, "train_loss": 0.1}]}]
    assert inference_summary(rows) == {"cells": 2, "energy_rose_cells": 1, "energy_rose_max": 0.25,
                                       "residual_median": 0.4, "residual_max": 0.5, "warned_cells": 1,
                                       "warned_min_lr": 2.0, "unconverged_cells": 2, "converged_below": 0.1}
    assert inference_summary(rows[3:]) is None
