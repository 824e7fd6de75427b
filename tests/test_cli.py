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
