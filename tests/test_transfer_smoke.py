"""The headline claim in CI: on real FashionMNIST the best learning rate stays put across widths under
muP and drifts under SP, for BP, PC and DTP (a reduced demo: widths 64-512, 7 learning rates x 2 seeds,
one epoch on 4,000 images; about 30 s on 2 cores).

Scaling law behind the thresholds: under SP with SGD the output layer's update grows like the width,
so the stable (and best) learning rate falls like M^-1/2 to M^-1, a slope of -0.5 to -1 octaves per
doubling; under muP it is Theta(1), slope 0. The test asks for |slope| <= 0.2 (muP) and <= -0.3 (SP),
each bound more than three bootstrap errors (about 0.03-0.1 here) away from the other's law.
"""
import pytest

from mulocal.experiments import demo


def test_best_lr_stays_under_mup_and_drifts_under_sp(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "QUICK", dict(widths=[64, 128, 256, 512], lrs=[2.0 ** k for k in range(-5, 2)],
                                            seeds=[0, 1], epochs=1, train_subset=4000, test_subset=1000))
    monkeypatch.setattr(demo, "RULES", ("bp", "pc", "dtp"))
    res = demo.run_demo(str(tmp_path), quick=True, json_mode=True, workers=0)
    slopes = {(r["algo"], r["param"]): r["slope"] for r in res["results"]}
    assert {a for a, _ in slopes} == {"bp", "pc", "dtp"}
    for algo in ("bp", "pc", "dtp"):
        mup, sp = slopes[(algo, "mup")], slopes[(algo, "sp")]
        assert mup is not None and abs(mup) <= 0.2, (algo, slopes)
        assert sp is not None and sp <= -0.3, (algo, slopes)
    # muP == SP at the base width: the two families share their width-64 optimum exactly
    by = {(r["algo"], r["param"]): r["best_lr"] for r in res["results"]}
    for algo in ("bp", "pc", "dtp"):
        assert by[(algo, "mup")]["64"] == pytest.approx(by[(algo, "sp")]["64"], rel=1e-12)
