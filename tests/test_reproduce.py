"""`mulocal reproduce`: the experiments run end to end (tiny budget) and keep their raw results."""
import json


from mulocal.cli import main


def test_transfer_experiment_tiny(tmp_path, capsys):
    rc = main(["reproduce", "fig1-left", "--budget", "tiny", "--out", str(tmp_path), "--workers", "0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {f["family"]["param"] for f in out["families"]} == {"mup", "sp"}
    assert (tmp_path / "fig1-left" / "fig1-left.png").stat().st_size > 5000
    # the raw results are in a store that `mulocal report` reads, with 2 params x 2 widths x 2 lrs x 3 seeds
    assert main(["report", "--store", out["store"], "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sum(rep["cells"].values()) == 24 and rep["cells"]["done"] + rep["cells"]["diverged"] == 24


def test_fig8_tiny(tmp_path, capsys):
    assert main(["reproduce", "fig8", "--budget", "tiny", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["omega_L"]) == {"bp mup-sgd", "tp mup-tp-sgd", "dtp mup-dtp-sgd"}
    # the numbers are kept in a store that `mulocal report` reads
    assert main(["report", "--store", out["store"], "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["results"]["fig8"]["summary"] == out["summary"]


def test_unknown_experiment_is_one_line():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "mulocal.cli", "reproduce", "fig99"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown experiment 'fig99'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
