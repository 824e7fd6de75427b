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
    "$.other_metric",  # report: the transfer metrics by the other metric (test accuracy / training loss)
    "$.families[].best_test_accuracy", "$.families[].learns",  # report: does the family learn at all
    "$.families[].inference",  # report: PC inference status of the family's cells
    "$.verdicts",  # report: muP vs its SP control by the verdict rule, by both metrics
    "$.replicas[].inference",  # train: PC inference status of the last epoch
    "$.axis",  # coord and report: the axis of the check / the transfer (width, or depth for residual nets)
}


# values deliberately changed since the golden files were written, each with the change (checked elsewhere)
CHANGED = {
    # the best-LR bootstrap also draws the fit window and spreads grid-minimum estimates over their cell
    # (tests/test_sweep.py::test_bootstrap_includes_the_grid_resolution)
    "$.families[].best[].log2_std", "$.families[].transfer.slope_boot_std", "$.families[].transfer.slope_err",
    "$.other_metric.families[].transfer.slope_boot_std", "$.other_metric.families[].transfer.slope_err",
}


def _same(a, b, path="$"):
    """Equal JSON, machine- and clock-dependent keys left out, floats to 1e-12 relative."""
    if re.sub(r"\[\d+\]", "[]", path) in CHANGED:
        return
    if isinstance(b, dict):
        assert isinstance(a, dict), path
        keys = set(b) - make_golden.VOLATILE
        new = {k for k in set(a) - keys - make_golden.VOLATILE if re.sub(r"\[\d+\]", "[]", f"{path}.{k}") not in ADDED}
        assert new == set() and keys <= set(a), (path, sorted(set(a) ^ set(b)))
        for k in keys:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        assert a == b or (math.isfinite(b) and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)), (path, a, b)
    else:
        assert a == b, (path, a, b)


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
