"""The benchmarks' own logic (benchmarks/, docs/PERFORMANCE.md), without running a benchmark or needing JAX.

* mulocal vs PCX (``bench_pc.py --pcx-python``, its side in ``_pcx_compare.py``): the agreement check that must stop
  the comparison when the two compute different losses; if it passed everything, a ratio against a different computation would be printed.
* ``--device``: every benchmark takes it (``./run.sh bench --device cuda`` passes the same flags to each), and
  a device that is not available ends the script with one line on stderr and status 2, not a traceback.
"""
import math
from pathlib import Path

import pytest
import torch

from benchscripts import BENCH, load

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


@pytest.fixture(scope="module")
def pcx_compare():
    return load("_pcx_compare")


def test_agreement_measures_the_largest_difference_relative_to_the_reference_scale(pcx_compare):
    a = pcx_compare.agreement([2.30, 2.10, 1.90], [2.30, 2.10 + 1e-6, 1.90])
    assert a["max_abs"] == pytest.approx(1e-6, rel=1e-6) and a["n"] == 3
    assert a["max_rel"] == pytest.approx(1e-6 / 2.30, rel=1e-6)
    assert pcx_compare.agrees(a)
    # a loss off by 1e-3 relative (a dropped term, another learning rate) stops the comparison
    assert not pcx_compare.agrees(pcx_compare.agreement([2.30, 2.10], [2.30, 2.10 * (1 + 1e-3)]))
    # nan or inf on either side never agrees; neither do different lengths
    assert not pcx_compare.agrees(pcx_compare.agreement([2.3, math.nan], [2.3, 2.1]))
    assert not pcx_compare.agrees(pcx_compare.agreement([2.3, 2.1], [2.3, math.inf]))
    with pytest.raises(ValueError):
        pcx_compare.agreement([1.0, 2.0], [1.0])
    # identical zeros agree; a difference against an all-zero reference does not
    assert pcx_compare.agrees(pcx_compare.agreement([0.0, 0.0], [0.0, 0.0]))
    assert not pcx_compare.agrees(pcx_compare.agreement([0.0, 1e-9], [0.0, 0.0]))


def test_the_threshold_is_the_documented_one(pcx_compare):
    assert pcx_compare.AGREE_RTOL == 1e-4
    ref = [1.0, 2.0]
    assert pcx_compare.agrees(pcx_compare.agreement([1.0, 2.0 * (1 + 0.9e-4)], ref))
    assert not pcx_compare.agrees(pcx_compare.agreement([1.0, 2.0 * (1 + 1.1e-4)], ref))


def test_mulocal_side_of_the_check_matches_its_rule_on_a_tiny_model(pcx_compare):
    """The check's mulocal side: initial weights in layer order W1 b1 W2 b2 W3 b3 as PCX reads them, one
    feed-forward loss per step, and training that moves the weights."""
    from mulocal.data import Dataset
    g = torch.Generator().manual_seed(0)
    data = Dataset("tiny", torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g),
                   torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g), 10)
    init, losses, after = pcx_compare.mulocal_check(data, 16, 0.1, 0.1, 3)
    assert [w.shape for w in init] == [(16, 784), (16,), (16, 16), (16,), (10, 16), (10,)]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    assert any((a != b).any() for a, b in zip(init, after))


def test_pcx_side_is_not_imported_by_the_package_or_the_tests():
    """_pcx_side.py needs JAX: nothing in src/ or tests/ may import it."""
    for path in list((ROOT / "src").rglob("*.py")) + list((ROOT / "tests").rglob("*.py")):
        if path.name == "test_bench.py":
            continue
        assert "_pcx_side" not in path.read_text(), path
    for script in ("bench_pc.py", "_pcx_compare.py"):
        assert "import jax" not in (BENCH / script).read_text(), script


def test_run_sh_passes_the_same_flags_to_every_benchmark():
    line = next(ln for ln in (ROOT / "run.sh").read_text().splitlines() if ln.strip().startswith("bench)"))
    assert 'benchmarks/bench_*.py' in line and '"$@"' in line
    assert {"bench_bp.py", "bench_pc.py", "bench_sweep.py", "bench_tp.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_takes_device_and_rejects_an_unusable_one_in_one_line(script, capsys):
    """Run in this process (``main(argv)``): exit status 2, no traceback, the reason on stderr; one line for the
    scripts that use ``_common.resolve_device`` (bench_tp reports through argparse: usage line + error line)."""
    mod = load(script[:-3])
    devices = [("tpu", "unknown device")] + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")])
    for device, why in devices:
        with pytest.raises(SystemExit) as exc:
            mod.main(["--device", device, "--dataset", "synthetic"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert any(why in ln for ln in lines), err
        if script != "bench_tp.py":
            assert lines == [lines[0]] and lines[0].startswith(f"{script[:-3]}: error:"), err
