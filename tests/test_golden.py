"""Guard rails for restructuring: a store written by an earlier version resumes with nothing rerun (same cell
hashes), and a fixed set of commands prints the same JSON (tests/golden/make_golden.py wrote both)."""
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)
CLI = json.loads((GOLDEN / "cli.json").read_text())


def test_old_store_resumes_with_nothing_rerun(tmp_path):
    from mulocal.sweep import expand, run_sweep
    from mulocal.config import config_hash
    from mulocal.sweep.store import Store
    store = tmp_path / "store.sqlite"
    shutil.copy(GOLDEN / "store.sqlite", store)
    spec = json.loads((GOLDEN / "store_spec.json").read_text())
    hashes = [config_hash(c) for c in expand(spec)]
    with Store(store, create=False) as st:
        old = {r["hash"]: r["status"] for r in st.rows(columns=("hash", "status"))}
    assert len(hashes) == len(old) == 64 and set(hashes) == set(old)
    assert set(old.values()) <= {"done", "diverged"}
    summary = run_sweep(spec, store, workers=0, threads=1, progress=False)
    assert summary["new"] == 0 and summary["ran"] == 0 and summary["complete"], summary


# keys added to the output since the golden files were written, each with the change that added it
ADDED = {
    "$.parameterization.optimizer",  # Parameterization.optimizer: the optimizer its exponents are for
    "$.parameterization.eps_exponents",  # muP with Adam: microsoft/mup's eps rule on the readout (test_adapter_mup)
    # coord: each W_l(0) Delta a_{l-1} term's random-matrix control, aligned excess and its noise floor; which term the
    # verdict reads (tests/test_coord_excess.py)
    "$.excess",
    "$.max_abs_slope_raw",
    "$.rms.Wdh_ctrl_2",
    "$.rms.Wdh_ctrl_3",
    "$.rms.Wdh_xs_2",
    "$.rms.Wdh_xs_3",
    "$.rms.Wdh_floor_2",
    "$.rms.Wdh_floor_3",
    "$.rms.df_ctrl",
    "$.rms.df_xs",
    "$.rms.df_floor",
    "$.slopes.Wdh_ctrl_2",
    "$.slopes.Wdh_ctrl_3",
    "$.slopes.Wdh_xs_2",
    "$.slopes.Wdh_xs_3",
    "$.slopes.Wdh_floor_2",
    "$.slopes.Wdh_floor_3",
    "$.slopes.df_ctrl",
    "$.slopes.df_xs",
    "$.slopes.df_floor",
    "$.slopes_per_step.Wdh_ctrl_2",
    "$.slopes_per_step.Wdh_ctrl_3",
    "$.slopes_per_step.Wdh_xs_2",
    "$.slopes_per_step.Wdh_xs_3",
    "$.slopes_per_step.Wdh_floor_2",
    "$.slopes_per_step.Wdh_floor_3",
    "$.slopes_per_step.df_ctrl",
    "$.slopes_per_step.df_xs",
    "$.slopes_per_step.df_floor",
    "$.other_metric",  # report: the transfer metrics by the other metric (test accuracy / training loss)
    "$.families[].best_test_accuracy", "$.families[].learns",  # report: does the family learn at all
    "$.families[].inference",  # report: PC inference status of the family's cells
    "$.verdicts",  # report: muP vs its SP control by the verdict rule, by both metrics
    "$.replicas[].inference",  # train: PC inference status of the last epoch
    "$.axis",  # coord and report: the axis of the check / the transfer (width, or depth for residual nets)
    # report: a family's values where every LR diverged and the control's slope bounded by them (test_verdict.py)
    "$.families[].transfer.n_censored", "$.families[].transfer.slope_bound", "$.families[].transfer.slope_bound_err",
    # coord: each slope's se over the replicas, the verdict's term and its se, every replica's values
    # (tests/test_coord_seeds.py)
    "$.slope_se", "$.leading", "$.max_abs_slope_se", "$.replicas",
}


# values deliberately changed since the golden files were written, each with the change (checked elsewhere)
CHANGED = {
    # the best-LR bootstrap also draws the fit window and spreads grid-minimum estimates over their cell
    # (tests/test_sweep.py::test_bootstrap_includes_the_grid_resolution)
    "$.families[].best[].log2_std", "$.families[].transfer.slope_boot_std", "$.families[].transfer.slope_err",
    "$.other_metric.families[].transfer.slope_boot_std", "$.other_metric.families[].transfer.slope_err",
    # coord: the verdict counts a term's aligned excess (Wdh_xs_l) in place of its raw value where it is resolved
    # (tests/test_coord_excess.py)
    "$.counted[]",
}


# How close a golden number must come. Every float here derives from the synthetic data set's float32 draws (train
# and coord directly; report through the stored results of runs on them; describe and sweep print exact numbers of
# the configuration), and torch.randn's float32 draws depend on the CPU's kernels: z = r cos(theta),
# r = sqrt(-2 ln u1), theta = 2 pi u2, evaluated by a vectorized kernel (SLEEF, <= 1 ulp) or a scalar one (libm,
# ATEN_CPU_CAPABILITY=default). Each rounds theta to within 2 pi x 2u of the exact angle (u = 2^-24), so their cosines
# (and sines) lie within 2 (2 pi 2u + 2u) ~ 30u of each other, their r within 2 x 2u r, and the draws within
# ~35u r: norm-wise 35u sqrt(E r^2) = 35 sqrt(2) u ~ 50u relative (E r^2 = E[-2 ln u1] = 2). The golden numbers
# (losses, accuracies, rms of activations and updates after a few float64 steps at a stable learning rate) are
# O(1)-conditioned functions of the data, so they move by as much: RTOL = 2^6 u = 2^-18 ~ 3.8e-6 relative. (The
# float64 computation's own rounding, ~1e-16 per operation, is far below; an accuracy, or a label (the teacher's
# argmax), moves only if a point's margin is within that perturbation.) Logs of such numbers move by RTOL / ln 2
# absolute, and the fits over log widths (coord's slopes, report's transfer slope and intercept) by the fit's
# condition times that (tests/tolerances.py fit_atol): absolute, as a slope near 0 (muP's) has no relative precision.
RTOL = 2.0 ** -18
LOG2 = {"$.families[].best[].log2_best_lr", "$.other_metric.families[].best[].log2_best_lr"}
FITS = re.compile(r"^\$\.(slopes\.[^.]+|slopes_per_step\.[^.]+\[\]|max_abs_slope"
                  r"|(other_metric\.)?families\[\]\.transfer\.(slope|intercept))$")


def _atol(key: str, widths) -> float:
    """The absolute part of the tolerance of the value at (the normalized) ``key``: see RTOL."""
    from tolerances import fit_atol
    if key in LOG2:
        return RTOL / math.log(2)
    m = FITS.match(key)
    if m is None:
        return 0.0
    assert widths, key  # a fit's x: the widths next to it (coord's, a report family's)
    slope, intercept = fit_atol([math.log2(w) for w in widths], RTOL / math.log(2))
    return intercept if key.endswith("intercept") else slope


def _same(a, b, path="$", widths=None):
    """Equal JSON, machine- and clock-dependent keys left out, floats to RTOL relative (plus the absolute part for
    logs and fits)."""
    key = re.sub(r"\[\d+\]", "[]", path)
    if key in CHANGED:
        return
    if isinstance(b, dict):
        assert isinstance(a, dict), path
        keys = set(b) - make_golden.VOLATILE
        new = {k for k in set(a) - keys - make_golden.VOLATILE if re.sub(r"\[\d+\]", "[]", f"{path}.{k}") not in ADDED}
        assert new == set() and keys <= set(a), (path, sorted(set(a) ^ set(b)))
        widths = b.get("widths", widths)
        for k in keys:
            _same(a[k], b[k], f"{path}.{k}", widths)
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]", widths)
    elif isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        tol = RTOL * max(abs(a), abs(b)) + _atol(key, widths)
        assert a == b or (math.isfinite(b) and abs(a - b) <= tol), (path, a, b, tol)
    else:
        assert a == b, (path, a, b)


def test_golden_tolerance_is_tight():
    """The comparison still fails a change of behaviour: a loss moved by 1e-5 relative, a slope by 1e-4 (above
    the fit's bound 2 / ln 2 x RTOL = 1.1e-5 for widths 16, 32), an accuracy by one test point."""
    train = next(c for c in CLI if c["argv"][0] == "train")["json"]
    coord = next(c for c in CLI if c["argv"][0] == "coord")["json"]
    for src, change in ((train, lambda d: d.update(test_loss=d["test_loss"] * (1 + 1e-5))),
                        (train, lambda d: d.update(test_accuracy=d["test_accuracy"] + 1 / 128)),
                        (coord, lambda d: d["slopes"].update(h_1=d["slopes"]["h_1"] + 1e-4)),
                        (coord, lambda d: d.update(max_abs_slope=d["max_abs_slope"] - 1e-4))):
        bad = json.loads(json.dumps(src))
        change(bad)
        with pytest.raises(AssertionError):
            _same(bad, src)
        _same(src, json.loads(json.dumps(src)))


@pytest.mark.parametrize("case", CLI, ids=[" ".join(c["argv"][:3]) + f"#{i}" for i, c in enumerate(CLI)])
def test_cli_json_unchanged(case, tmp_path):
    shutil.copy(GOLDEN / "store.sqlite", tmp_path / "store.sqlite")
    _same(make_golden.run_cli(case["argv"], tmp_path), case["json"])


# the seeds of every named random stream, frozen (changing a recipe changes every stored result)
STREAM_SEEDS = {"init": [0, 5], "data_order": [9012144119660052412, 3264952771414259452],
                "pretrain_order": [3916537110950102340, 7924836575781094238],
                "feedback_init": [5967312527942628462, 1594098205414373333],
                "feedback_noise": [7846657300023086167, 7514641732151185879],
                "feedback_noise_counter": [7917684129304790077, 3248670032553065317],  # counter_normal keys
                "pc_values": [3, 5000018], "subset": [0, 5]}


def test_named_streams_are_frozen():
    from mulocal.streams import STREAMS, seed_of
    assert set(STREAMS) == set(STREAM_SEEDS)
    for name, seeds in STREAM_SEEDS.items():
        assert [seed_of(name, s, 3) for s in (0, 5)] == seeds, name


def test_a_new_implicit_field_keeps_old_hashes(monkeypatch):
    """How a field is added without invalidating stores: implicit fields stay out of a cell at their default."""
    from mulocal import config
    from mulocal.config import config_hash
    from mulocal.sweep import expand
    spec = json.loads((GOLDEN / "store_spec.json").read_text())
    before = [config_hash(c) for c in expand(spec)]
    monkeypatch.setitem(config.FIELDS, "residual", config.Field("residual", "bool", False, "residual blocks",
                                                                "model", implicit=True))
    assert [config_hash(c) for c in expand(spec)] == before
    changed = [config_hash(c) for c in expand({**spec, "residual": True})]
    assert not set(changed) & set(before) and len(changed) == len(before)


def test_new_pc_options_keep_old_hashes_but_not_where_behaviour_changed():
    """PC's options added later are implicit: sequential PC cells keep their hashes; parallel inference without
    FPA and kappa (whose default step changed) records the new default, so old results are not reused."""
    from mulocal.config import default_cell, resolved_algo
    seq = resolved_algo(default_cell(algo="pc", algo_options={"T": 3}))
    assert "parallel_step" not in seq and "guard" not in seq
    par = resolved_algo(default_cell(algo="pc", algo_options={"T": 3, "inference": "parallel"}))
    assert par["parallel_step"] == "bound"
    fixed = resolved_algo(default_cell(algo="pc", algo_options={"T": 3, "inference": "parallel", "kappa": 0.2}))
    assert "parallel_step" not in fixed
