"""The adapter's muP against microsoft/mup on models the project does not ship (tests/models_user.py: a VGG-style
conv net with max pooling and a strided conv; a residual conv net of a user's two-conv blocks).

mup's side: the same factory with ``mup.MuReadout`` as the readout (as mup requires), ``set_base_shapes(model, base,
delta=...)`` (which rescales the readout by sqrt(width_mult)), ``MuSGD`` / ``MuAdam``. mulocal's side: the factory
with a plain ``nn.Linear`` readout through ``ModuleNet``, preset mup-sgd / mup-adam at the same base width, depth
factors off (``depth_free``: mup has none). The two are the same abc-class: mup's readout computes
(theta / m) a (MuReadout divides its input by m = width / base), mulocal's W a, so W = theta / m and every other
tensor is equal. The oracle: starting from that correspondence, a few steps of each optimizer give the same
function (outputs on a probe to 1e-10 relative, float64) and the same tensors -- which holds only if every
tensor's learning rate (and init std's width exponent, checked separately against the empirical stds of mup's
own initialisation) agree.

Adam's epsilon: MuAdam does not scale eps, but its readout's gradient is (1/m) mulocal's, so mup's update of the
readout is mulocal's with eps * m: the mup preset with Adam has that rule (``eps_exponents = (0, 0, -1)``), and the
Adam test runs at eps = 1e-8 with gradients as small as eps, where another eps rule on any tensor shows; a control
with e_out = 0 must then differ.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models_user as U
from mulocal.adapter import ModuleNet
from mulocal.algos import make_algo
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset
from oracles import close

mup = pytest.importorskip("mup")
F64 = torch.float64
M0, M = 4, 16  # base width and the width trained


def _mup_model(make, width):
    torch.manual_seed(0)
    model = make(width, readout=mup.MuReadout).double()
    base = make(M0, readout=mup.MuReadout)
    delta = make(2 * M0, readout=mup.MuReadout)
    mup.set_base_shapes(model, base, delta=delta)
    return model


def _pair(make, optimizer):
    param = preset("mup", optimizer, base_width=M0).depth_free()
    net = ModuleNet(lambda w: make(w), (1, 28, 28), M, param, K=1, seeds=[3], dtype=F64)
    model = _mup_model(make, M)
    m = M / M0
    names = dict(model.named_modules())
    readout = [mod for mod in model.modules() if isinstance(mod, mup.MuReadout)][0]
    with torch.no_grad():
        for unit, layer in zip(net.units, net.layers):
            mod = names[unit.name]
            for (pname, p), t in zip(mod.named_parameters(), layer.tensors(), strict=True):
                scale = m if (mod is readout and pname == "weight") else 1.0  # theta = m W on the readout
                p.copy_(t[0] * scale)
    return net, model, readout, m


@pytest.mark.parametrize("make", [U.vgg, U.resnet], ids=["vgg", "resnet"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_adapter_trains_as_microsoft_mup(make, optimizer):
    """3 BP steps: mulocal's ModuleNet + LayerwiseOptimizer (mup preset) vs mup's MuSGD / MuAdam on the same model:
    equal outputs and tensors (W = theta / m on the readout) to 1e-10. A wrong role (input/hidden/output), fan-in
    or learning-rate exponent of any tensor moves them by O(1)."""
    net, model, readout, m = _pair(make, optimizer)
    lr = 0.05 if optimizer == "sgd" else 1e-3
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 8, 1, 28, 28, generator=g, dtype=F64)
    ys = torch.randint(0, 10, (3, 8), generator=g)
    probe = torch.randn(16, 1, 28, 28, generator=g, dtype=F64)
    with torch.no_grad():
        assert close(net(probe)[0], model(probe))[0]  # the correspondence holds at the start
    if optimizer == "sgd":
        ours = LayerwiseOptimizer.for_net(net, lr, "sgd")
        theirs = mup.MuSGD(model.parameters(), lr=lr)
    else:
        ours = LayerwiseOptimizer.for_net(net, lr, "adam", eps=1e-8)  # the preset's eps rule: eps * m on the readout
        theirs = mup.MuAdam(model.parameters(), lr=lr, eps=1e-8)
    bp = make_algo("bp")
    for x, y in zip(xs, ys):
        grads, _ = bp.step(net, x, y)
        ours.step(grads)
        theirs.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        theirs.step()
    with torch.no_grad():
        ok, err = close(net(probe)[0], model(probe))
    assert ok, f"outputs differ by {err:.3g}"
    names = dict(model.named_modules())
    for unit, layer in zip(net.units, net.layers):
        mod = names[unit.name]
        for (pname, p), t in zip(mod.named_parameters(), layer.tensors()):
            scale = m if (mod is readout and pname == "weight") else 1.0
            ok, err = close(t[0] * scale, p.detach())
            assert ok, f"{unit.name}.{pname} differs by {err:.3g}"


def test_mups_adam_epsilon_is_eps_times_m_on_the_readout():
    """The control of the Adam test: with eps unscaled on the readout (e_out = 0) mulocal's readout moves away from
    mup's after a step at eps comparable with the gradients (so the eps rule is what the Adam test compares)."""
    net, model, readout, m = _pair(U.vgg, "adam")
    net.param = net.param.with_(eps_exponents=(0.0, 0.0, 0.0))
    for layer, unit in zip(net.layers, net.units):
        layer.rule = net.param.rule(layer.rule.role, _fan(unit), M, None, False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g, dtype=F64), torch.randint(0, 10, (8,), generator=g)
    eps = 1e-3
    ours = LayerwiseOptimizer.for_net(net, 1e-3, "adam", eps=eps)
    theirs = mup.MuAdam(model.parameters(), lr=1e-3, eps=eps)
    grads, _ = make_algo("bp").step(net, x, y)
    ours.step(grads)
    nn.functional.cross_entropy(model(x), y).backward()
    theirs.step()
    assert not close(net.layers[-1].weight[0] * m, readout.weight.detach())[0]
    assert close(net.layers[0].weight[0], model[0].weight.detach())[0]  # the input layer's eps is the same


def _fan(unit):
    return next(s.fan_in for s in unit.params if s.matrix)


@pytest.mark.parametrize("make", [U.vgg, U.resnet], ids=["vgg", "resnet"])
def test_init_width_exponents_match_mups_initialisation(make):
    """Each matrix's init std, as a function of width, has mup's exponent: mulocal's std(M) / std(M0) equals the
    empirical ratio of mup's effective stds (its own torch initialisation, readout rescaled by sqrt(m) and
    multiplied by 1/m in the forward). Tolerance from the sample size: the std of n uniform draws is within
    ~3 / sqrt(n) relative (0.1% of such draws fall outside)."""
    def theirs(width):
        model = _mup_model(make, width)
        out = []
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                w = mod.weight.detach()
                eff = w.std().item() / (mod.width_mult() if isinstance(mod, mup.MuReadout) else 1.0)
                out.append((eff, w.numel()))
        return out

    big = 4 * M
    a0, a1 = _matrix_stds(make, M0), _matrix_stds(make, big)
    t0, t1 = theirs(M0), theirs(big)
    assert len(a0) == len(t0)
    for (s0, s1), ((e0, n0), (e1, n1)) in zip(zip(a0, a1), zip(t0, t1)):
        want = e1 / e0
        tol = 3 / min(n0, n1) ** 0.5 * 2
        assert abs((s1 / s0) / want - 1) < tol, (s1 / s0, want)


def _matrix_stds(make, width):
    net = ModuleNet(make, (1, 28, 28), width, preset("mup", "sgd", base_width=M0).depth_free(), K=1)
    out = []
    for layer in net.layers:
        if hasattr(layer, "rules"):
            out += [r.init_std for r, s in zip(layer.rules, layer.specs) if s.matrix]
        else:
            out.append(layer.rule.init_std)
    return out
