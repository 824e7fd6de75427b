"""PC's stable range gbar_L >= -1: the preset warns below it, the CLI shows the warning on one line and
still runs, and the exponent fitter flags an inference perturbation that grows with width.

Oracle: the scaling law of PC's inference perturbation of v_{L-1}. Single-shot inference from the
feed-forward values moves v_{L-1} by gamma_L W_L^T e_L, with gamma_L ~ M^{-gbar_L}, e_L = Theta(1) and
W_L ~ M^{-b_L}, b_L = 1 under muP: it scales like M^{-1 - gbar_L}, which grows with width exactly when
gbar_L < -1.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest

from mulocal.algos import make_algo
from mulocal.cli import main
from mulocal.diagnostics.coord import coord_batches
from mulocal.diagnostics.derive import derive
from mulocal.errors import UnstableParameterizationWarning
from mulocal.nets import build
from mulocal.param import preset

UNSTABLE_GBARS = [-2.0, -1.5]
STABLE_GBARS = [-1.0, 0.0, 1.0]
TRAIN = ["train", "--algo", "pc", "--dataset", "synthetic", "--width", "32", "--epochs", "1", "--no-progress"]


def _warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line.lower()]


# ------------------------------------------------------------------------------------ the preset warns
@pytest.mark.parametrize("gbar", UNSTABLE_GBARS)
def test_preset_warns_below_minus_one(gbar):
    with pytest.warns(UnstableParameterizationWarning) as rec:
        p = preset("mup", "sgd", gamma_bar_L=gbar, algo="pc")
    assert p.gamma_bar_L == gbar  # a warning, not an error: the unstable regime can still be studied
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "\n" not in msg and ">= -1" in msg
    assert f"M^{-1 - gbar:g}" in msg  # the growth exponent -1 - gbar_L > 0 (M^1, M^0.5)


@pytest.mark.parametrize("gbar", STABLE_GBARS)
def test_no_warning_in_stable_range(gbar):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableParameterizationWarning)
        for name in ("mup", "sp"):
            preset(name, "sgd", gamma_bar_L=gbar, algo="pc")
        preset("gnt", "sgd", algo="pc")  # PC's maximal perturbation, gbar_L = -1: stable


# ------------------------------------------------------------------------------------ the CLI: one line
def test_cli_train_warns_on_one_line_and_runs():
    """A real process (Python's own warning format would show file:line and the source line)."""
    env = {**os.environ, "PYTHONWARNINGS": ""}
    proc = subprocess.run([sys.executable, "-m", "mulocal", *TRAIN, "--gamma-bar-L=-2"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    warns = _warning_lines(proc.stderr)
    assert len(warns) == 1, proc.stderr
    assert warns[0].startswith("mulocal: warning: gamma_bar_L = -2 < -1 is unstable for PC"), warns
    assert "Traceback" not in proc.stderr and "UnstableParameterizationWarning" not in proc.stderr
    assert "warnings.warn" not in proc.stderr
    assert "test accuracy" in proc.stdout  # it trained


def test_cli_train_stable_has_no_warning(capsys):
    assert main([*TRAIN, "--gamma-bar-L=-1"]) == 0
    assert _warning_lines(capsys.readouterr().err) == []


# ------------------------------------------------------------------------------------ the fitter flags it
def _derive(data, gbar):
    batches, probe = coord_batches(data, 1, 64, seed=0)
    start = preset("sp", "sgd", gamma_bar_L=gbar, algo="pc")

    def make(p, w):
        return build("mlp", data.input_shape, 10, w, p, K=2, seeds=range(2), bias=False)
    return derive(make, make_algo("pc"), start, [64, 128, 256], batches, probe, 0.1, "sgd", rounds=2)


@pytest.mark.filterwarnings("ignore::mulocal.errors.UnstableParameterizationWarning")
@pytest.mark.parametrize("gbar", UNSTABLE_GBARS + STABLE_GBARS)
def test_fitter_flags_growing_inference_perturbation(synth, gbar):
    res = _derive(synth, gbar)
    law = -1.0 - gbar  # slope of the perturbation of v_{L-1} (L = 3: pert_2)
    slope = res.perturbation_slopes["pert_2"]
    assert slope == pytest.approx(law, abs=0.3), res.table()
    out = res.to_dict()
    if law > 0:
        assert "pert_2" in res.unstable and out["unstable"] == res.unstable, res.table()
        note = [line for line in res.table().splitlines() if line.startswith("UNSTABLE")]
        assert len(note) == 1 and "pert_2" in note[0] and "gbar_L >= -1" in note[0]
    else:
        assert res.unstable == [] and out["unstable"] == [] and out["unstable_note"] is None, res.table()
        assert "UNSTABLE" not in res.table()


def test_cli_derive_prints_the_flag(capsys):
    args = ["derive", "--algo", "pc", "--gamma-bar-L=-2", "--optimizer", "sgd", "--dataset", "synthetic",
            "--widths", "64,128,256", "--rounds", "2", "--replicas", "2"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert [line for line in cap.out.splitlines() if line.startswith("UNSTABLE")], cap.out
    assert len(_warning_lines(cap.err)) == 1, cap.err  # the preset is built twice (start, reference): shown once
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "pert_2" in out["unstable"] and out["perturbation_slopes"]["pert_2"] == pytest.approx(1.0, abs=0.3)
