"""Feature-learning diagnostic: the numbers against a numpy oracle, and the width laws of TP's muP.

Oracles: (a) the share, the relative feature and weight changes recomputed in numpy from the nets' weights
(forward pass and muP multipliers written out here, multipliers from the parameterization's formula);
(b) TP's theory: under its muP (b_L = 1/2) the output change caused by the hidden features moving is
Theta(1), with b_L = 1 it vanishes like M^-1/2 while the features still move Theta(1); (c) BP under its muP
keeps the share Theta(1) (aligned updates); (d) replica k equals a separate run with seed k.
"""
import numpy as np
import pytest
import torch

from mulocal.algos import make_algo
from mulocal.diagnostics.coord import coord_batches
from mulocal.diagnostics.features import feature_learning
from mulocal.nets import build
from mulocal.param import preset

WIDTHS = [64, 128, 256, 512]
LR = 0.2
STEPS = 3


def _rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


def _forward(Ws, bs, mults, x):
    """Numpy MLP (tanh hidden): the hidden activities h_1..h_{L-1} and the output f."""
    h, hs = x, []
    for l, (W, b, m) in enumerate(zip(Ws, bs, mults), start=1):
        u = m * h @ W.T + b
        if l < len(Ws):
            h = np.tanh(u)
            hs.append(h)
    return hs, u


def test_share_and_changes_equal_numpy_oracle(synth):
    """Float64: every per-replica value at the last step equals its numpy recomputation (1e-10), with
    a forward multiplier on the output (a_L = 1/2: m^-1/2 != 1) that the share must include; and the
    decomposition f(t) - f(0) = W_L(t) dh + dW_L h(0) + db_L holds to 1e-10."""
    base = 16
    p = preset("mup", "sgd", algo="dtp", base_width=base).with_(a=(0.0, 0.0, 0.5))
    seeds = [2, 7]
    nets, init = {}, {}

    def make(w):
        net = build("mlp", synth.input_shape, 10, w, p, K=2, seeds=seeds, dtype=torch.float64)
        nets[w] = net
        init[w] = [(l.weight.clone().numpy(), l.bias.clone().numpy()) for l in net.layers]
        return net

    batches, probe = coord_batches(synth, 2, 32, probe_size=48, seed=1)
    res = feature_learning(make, make_algo("dtp"), [32, 64], batches, probe, 0.3)
    assert res.steps == [1, 2] and res.depth == 3
    assert res.identity_residual < 1e-10
    x = probe.double().numpy()
    for i, w in enumerate([32, 64]):
        mults = [1.0, 1.0, (w / base) ** -0.5]
        for k in range(2):
            W0 = [a[k] for a, _ in init[w]]
            b0 = [b[k] for _, b in init[w]]
            Wt = [l.weight[k].numpy() for l in nets[w].layers]
            bt = [l.bias[k].numpy() for l in nets[w].layers]
            h0, f0 = _forward(W0, b0, mults, x)
            ht, ft = _forward(Wt, bt, mults, x)
            dh = ht[-1] - h0[-1]
            feat = mults[-1] * dh @ Wt[-1].T
            read = mults[-1] * h0[-1] @ (Wt[-1] - W0[-1]).T + (bt[-1] - b0[-1])
            assert np.abs(ft - f0 - feat - read).max() <= 1e-10 * _rms(ft - f0)
            expect = {"share": _rms(feat) / _rms(ft - f0), "feat": _rms(feat), "read": _rms(read),
                      "df": _rms(ft - f0), "share_init": _rms(mults[-1] * dh @ W0[-1].T) / _rms(ft - f0)}
            for l in (1, 2):
                expect[f"dh_rel_{l}"] = np.linalg.norm(ht[l - 1] - h0[l - 1]) / np.linalg.norm(h0[l - 1])
            for l in (1, 2, 3):
                expect[f"dW_rel_{l}"] = np.linalg.norm(Wt[l - 1] - W0[l - 1]) / np.linalg.norm(W0[l - 1])
            for name, v in expect.items():
                got = res.per_replica[name][i][-1][k]
                assert got == pytest.approx(v, rel=1e-10), (name, w, k, got, v)
        assert res.values["share"][i][-1] == pytest.approx(np.mean(res.per_replica["share"][i][-1]), rel=1e-12)
    assert 0 < res.values["share"][0][-1] < 2


def _run(data, pname, algo, base_width=8, K=3, **algo_kw):
    p = preset(pname, "sgd", algo=algo, base_width=base_width)
    batches, probe = coord_batches(data, STEPS, 64, seed=0)
    return feature_learning(lambda w: build("mlp", data.input_shape, 10, w, p, K=K, seeds=range(K)),
                            make_algo(algo, **algo_kw), WIDTHS, batches, probe, LR)


def test_dtp_share_flat_under_mup_and_vanishes_with_bL1(synth):
    """DTP (trainable feedback): under its muP the share of the output change due to the features is
    width-independent; with b_L = 1 it falls like M^-1/2 although the hidden features still move Theta(1)
    (only the readout learns at large width). Base width 8, so that widths 64-512 are m = 8-64: the share
    is feat / rms(feat + read), bounded by about 1, and reaches its M^-1/2 law only once feat << read
    (at the base width both presets coincide and feat ~ read)."""
    mup = _run(synth, "mup", "dtp")
    ctrl = _run(synth, "mup-bL1", "dtp")
    assert abs(mup.slopes["share"]) <= 0.15, mup.table()
    assert ctrl.slopes["share"] == pytest.approx(-0.5, abs=0.15), ctrl.table()
    assert ctrl.slopes["feat"] == pytest.approx(-0.5, abs=0.15), ctrl.table()
    for res in (mup, ctrl):
        for l in (1, 2):
            assert abs(res.slopes[f"dh_rel_{l}"]) <= 0.15, res.table()
    table = ctrl.table()
    assert table.splitlines()[-1].startswith("slope") and len(table.splitlines()) == 3 + len(WIDTHS) + 1


def test_bp_mup_share_flat(synth):
    """Negative control: BP under its muP (b_L = 1, updates aligned with W_L) keeps the share Theta(1)."""
    res = _run(synth, "mup", "bp", base_width=64)
    assert abs(res.slopes["share"]) <= 0.15, res.table()
    assert abs(res.slopes["dh_rel_2"]) <= 0.15, res.table()


def test_replicas_equal_separate_runs(synth, tmp_path):
    """Seeds (4, 9) batched as K = 2 give the numbers of two K = 1 runs (trainable DTP feedback: its own
    init and noise streams per seed); and the result serialises and plots."""
    p = preset("mup", "sgd", algo="dtp", base_width=8)
    batches, probe = coord_batches(synth, 2, 32, probe_size=64, seed=2)

    def run(seeds):
        return feature_learning(lambda w: build("mlp", synth.input_shape, 10, w, p, K=len(seeds), seeds=seeds,
                                                dtype=torch.float64),
                                make_algo("dtp", fb_iters=2), [16, 32], batches, probe, 0.3)

    both = run([4, 9])
    for k, s in enumerate([4, 9]):
        one = run([s])
        for name, table in both.per_replica.items():
            for i in range(2):
                for t in range(2):
                    assert table[i][t][k] == pytest.approx(one.per_replica[name][i][t][0], rel=1e-9, abs=1e-13)
    assert both.per_replica["share"][1][-1][0] != pytest.approx(both.per_replica["share"][1][-1][1], rel=1e-6)
    import json
    d = json.loads(json.dumps(both.to_dict()))
    assert d["widths"] == [16, 32] and set(d["slopes"]) == set(both.values)
    path = both.plot(str(tmp_path / "features.png"), "dtp")
    assert (tmp_path / "features.png").stat().st_size > 0 and path.endswith("features.png")
