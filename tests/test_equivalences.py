"""Equivalences: every parameterization is the standard one at the base width."""
import pytest
import torch

from mulocal.nets import build
from mulocal.optim import LayerwiseOptimizer, lr_table
from mulocal.param import preset


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 28, 28)), ("cnn", (1, 28, 28))])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_mup_equals_sp_at_base_width(arch, shape, opt):
    mup, sp = preset("mup", opt, base_width=48), preset("sp", opt, base_width=48)
    a = build(arch, shape, 10, 48, mup, seeds=[7])
    b = build(arch, shape, 10, 48, sp, seeds=[7])
    for p, q in zip(a.params(), b.params()):
        assert torch.equal(p, q)
    assert [r["lr"] for r in lr_table(a, 0.3)] == [r["lr"] for r in lr_table(b, 0.3)]
    assert [layer.mult for layer in a.layers] == [layer.mult for layer in b.layers]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_mup_differs_from_sp_away_from_base_width(opt):
    """The converse, so the test above can fail: at 4x the base width the output init and LRs differ."""
    mup, sp = preset("mup", opt), preset("sp", opt)
    a = build("mlp", (20,), 10, 256, mup, seeds=[7])
    b = build("mlp", (20,), 10, 256, sp, seeds=[7])
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    ratio = a.layers[-1].weight.std() / b.layers[-1].weight.std()
    assert ratio == pytest.approx(0.5, rel=1e-6)  # m^{-(1 - 1/2)} with m = 4
    lr_mup = [r["lr"] for r in lr_table(a, 1.0) if r["tensor"] == "weight"]
    expected = {"sgd": [4.0, 1.0, 0.25], "adam": [1.0, 0.25, 0.25]}[opt]
    assert lr_mup == pytest.approx(expected)


def test_init_std_follows_exponents():
    """Empirical init std of each layer matches sigma/sqrt(fan_in) * m^-(b - b_SP) across widths."""
    p = preset("mup", "sgd", base_width=64)
    for width in (64, 512):
        net = build("mlp", (100,), 10, width, p, seeds=[1])
        m = width / 64
        expect = [1 / 100 ** 0.5, 1 / width ** 0.5, 1 / width ** 0.5 * m ** -0.5]
        for layer, e in zip(net.layers, expect):
            assert layer.weight.std().item() == pytest.approx(e, rel=0.08)


def test_optimizer_uses_per_layer_and_per_replica_lrs():
    p = preset("mup", "sgd", base_width=32)
    net = build("mlp", (5,), 3, 128, p, K=2, seeds=[0, 1], dtype=torch.float64)
    opt = LayerwiseOptimizer.for_net(net, [0.1, 0.2], "sgd")
    before = [t.clone() for t in net.params()]
    grads = [torch.ones_like(t) for t in net.params()]
    opt.step(grads)
    scales = [4.0, 4.0, 1.0, 4.0, 0.25, 1.0]  # W1, b1, W2, b2, W3, b3 at m = 4
    for t, t0, s in zip(net.params(), before, scales):
        step = (t0 - t).flatten(1)
        assert torch.allclose(step[0], torch.full_like(step[0], 0.1 * s))
        assert torch.allclose(step[1], torch.full_like(step[1], 0.2 * s))
