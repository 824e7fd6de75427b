"""PCX's VGG-5 / VGG-7 (``mulocal.zoo``, ``--arch vgg5`` / ``vgg7``) against hand-written facts and autograd.

* structure: the blocks written out by hand from PCX's scripts (conv 3 x 3 -> activation [-> 2 x 2 max pool], channel
  multiples 1 2 4 4 / 1 1 2 2 4 4, VGG-7's unpadded 4th and 6th convs, the 4th padded on 28 x 28), the maps they give
  on 1 x 28 x 28 and 3 x 32 x 32, and the parameter count by a closed formula;
* reading: the adapter reads the first conv as the input layer, the readout as the output layer, the rest as hidden,
  with fan-in = channels x kernel area;
* gradients: BP through ``ModuleNet`` equals autograd of the plain ``nn.Sequential`` loaded with the same effective
  weights (float64, muP multipliers != 1); PC with F-ini + FPA + T = 1 + kappa = 1/gamma gives the BP gradient
  (the identity of ``algos/pc/state.py``), and its general step (parallel, momentum) runs and moves every tensor;
* the cell: ``--arch vgg5`` builds the adapter net with the cell's activation and bias, refuses a depth other than
  its own in one line, and trains above chance on a FashionMNIST subset.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mulocal import zoo
from mulocal.adapter import ModuleNet
from mulocal.algos import make_algo
from mulocal.config import assemble, default_cell
from mulocal.data import Dataset
from mulocal.errors import ConfigError
from mulocal.nets import sizes
from mulocal.param import preset
from oracles import close

F64 = torch.float64
SHAPES = [(1, 28, 28), (3, 32, 32)]
# by hand from PCX's scripts: (channel multiple, pooled, padding) per conv, for each input
PLAN = {
    ("vgg5", (1, 28, 28)): [(1, True, 1), (2, True, 1), (4, True, 1), (4, True, 1)],
    ("vgg5", (3, 32, 32)): [(1, True, 1), (2, True, 1), (4, True, 1), (4, True, 1)],
    ("vgg7", (3, 32, 32)): [(1, True, 1), (1, False, 1), (2, True, 1), (2, False, 0), (4, True, 1), (4, False, 0)],
    # 28 x 28: 7 -> 5 -> pool 2 -> a valid 3 x 3 conv has nothing left, so the 4th conv keeps its padding
    ("vgg7", (1, 28, 28)): [(1, True, 1), (1, False, 1), (2, True, 1), (2, False, 1), (4, True, 1), (4, False, 0)],
}
# the maps after each block (h = w), by hand: 28 -> 14 -> 7 -> 3 -> 1; 32 -> 16 -> 8 -> 4 -> 2; VGG-7 on 32:
# 16, 16, 8, 6, 3, 1; on 28: 14, 14, 7, 7, 3, 1
MAPS = {("vgg5", (1, 28, 28)): [14, 7, 3, 1], ("vgg5", (3, 32, 32)): [16, 8, 4, 2],
        ("vgg7", (3, 32, 32)): [16, 16, 8, 6, 3, 1], ("vgg7", (1, 28, 28)): [14, 14, 7, 7, 3, 1]}
CASES = sorted(PLAN)


def _n_params(arch, width, shape, n_classes=10):
    """The closed formula: 3 x 3 kernels, biases, and the readout (fan-in 4w x s^2, s the last map's side)."""
    c, w = shape[0], width
    s = MAPS[(arch, shape)][-1]
    if arch == "vgg5":  # C->w, w->2w, 2w->4w, 4w->4w
        return 9 * w * (c + 2 * w + 8 * w + 16 * w) + (w + 2 * w + 4 * w + 4 * w) \
            + 4 * w * s * s * n_classes + n_classes
    # C->w, w->w, w->2w, 2w->2w, 2w->4w, 4w->4w
    return 9 * w * (c + w + 2 * w + 4 * w + 8 * w + 16 * w) + (w + w + 2 * w + 2 * w + 4 * w + 4 * w) \
        + 4 * w * s * s * n_classes + n_classes


@pytest.mark.parametrize("arch,shape", CASES)
def test_blocks_maps_and_parameter_count_are_pcx_nets_written_by_hand(arch, shape):
    """The modules are conv -> activation [-> max pool 2] per block (PCX pools after the activation), with the
    hand-written channel multiples and paddings; the maps shrink as written; the parameter count equals the closed
    formula (at the full width 128 too) and ``nets.sizes`` (memory planning) gives it without building. Breaks if a
    channel multiple, a padding, the pooling or its place, or the readout's fan-in is wrong."""
    width = 4
    model = zoo.vgg(arch, width, shape, activation="gelu")
    kinds, convs = [], []
    for m in model:
        kinds.append(type(m).__name__)
        if isinstance(m, nn.Conv2d):
            convs.append(m)
    want = []
    for _, pooled, _ in PLAN[(arch, shape)]:
        want += ["Conv2d", "GELU"] + (["MaxPool2d"] if pooled else [])
    assert kinds == want + ["Flatten", "Linear"]
    assert [(c.out_channels // width, c.padding[0], c.kernel_size) for c in convs] == \
        [(mult, pad, (3, 3)) for mult, _, pad in PLAN[(arch, shape)]]
    h, sides, mods = torch.zeros(2, *shape), [], list(model)
    for i, m in enumerate(mods):  # the map after each block: after its pooling, or its activation if unpooled
        h = m(h)
        if isinstance(m, nn.MaxPool2d) or (isinstance(m, nn.GELU) and not isinstance(mods[i + 1], nn.MaxPool2d)):
            sides.append((h.shape[-2], h.shape[-1]))
    assert sides == [(s, s) for s in MAPS[(arch, shape)]]
    assert h.shape == (2, 10)
    for w in (width, 128):
        got = sum(p.numel() for p in zoo.vgg(arch, w, shape).parameters())
        assert got == _n_params(arch, w, shape)
        assert sizes(arch, shape, 10, w, 3)[0] == _n_params(arch, w, shape)


@pytest.mark.parametrize("arch,shape", CASES)
def test_adapter_reads_input_hidden_output_roles_and_runs_both_inputs(arch, shape):
    """Through ``ModuleNet``: one unit per conv plus the readout; roles input (first conv: fan-out grows with the
    width, fan-in C x 9 does not), hidden (both grow), output (the readout: fan-in 4w s^2, 10 outputs); fan-in =
    channels x kernel area; f has shape (K, B, 10); the activations per sample of ``nets.sizes`` are the units'
    outputs. Breaks if the adapter or the zoo mis-scale a layer (a wrong role changes its init and LR)."""
    width = 8
    net = ModuleNet(zoo.factory(arch, shape, "relu"), shape, width, preset("mup", "adam", base_width=4), K=2,
                    seeds=[0, 1])
    plan = PLAN[(arch, shape)]
    assert net.depth == len(plan) + 1 == zoo.weight_layers(arch)
    roles = [u.role for u in net.units]
    assert roles == ["input"] + ["hidden"] * (len(plan) - 1) + ["output"]
    c_in = [shape[0]] + [m * width for m, _, _ in plan[:-1]]
    s = MAPS[(arch, shape)][-1]
    assert [layer.fan_in for layer in net.layers] == [c * 9 for c in c_in] + [4 * width * s * s]
    f = net(torch.randn(3, *shape))
    assert f.shape == (2, 3, 10) and torch.isfinite(f).all()
    acts = sum(math.prod(net._u_shapes[l]) for l in range(1, net.depth + 1))
    assert sizes(arch, shape, 10, width, 3)[1] == acts


def _effective(model, net, k=0):
    """Load replica k's effective weights (tensor x width multiplier) into the plain nn.Sequential."""
    mods = [m for m in model if any(True for _ in m.parameters())]
    with torch.no_grad():
        for m, layer in zip(mods, net.layers, strict=True):
            for p, t, kind in zip(m.parameters(), layer.tensors(), layer.kinds(), strict=True):
                p.copy_(t[k] * (layer.rule.multiplier if kind == "weight" else 1.0))
    return mods


@pytest.mark.parametrize("arch,shape", [("vgg5", (1, 28, 28)), ("vgg7", (3, 32, 32)), ("vgg7", (1, 28, 28))])
def test_bp_gradients_are_autograd_of_the_plain_sequential(arch, shape):
    """BP on the adapter net (explicit conv adjoints, vjp through activation + pooling) equals autograd of the cross-
    entropy of the zoo's own nn.Sequential with the same effective weights: d/dtheta f(mult theta) = mult x the
    effective gradient (float64, width 6 over base 2 with multipliers m^0.5, m^-0.5, m^-1 on the input, hidden and
    output layers: a = (-0.5, 0.5, 1)). Breaks if a conv adjoint, a multiplier, the pooling's adjoint or the flatten
    order is wrong."""
    width = 6
    param = preset("mup", "sgd", base_width=2, a=(-0.5, 0.5, 1.0))
    net = ModuleNet(zoo.factory(arch, shape, "tanh"), shape, width, param, K=1, seeds=[3], dtype=F64)
    assert len({layer.rule.multiplier for layer in net.layers}) == 3
    model = zoo.vgg(arch, width, shape, activation="tanh").double()
    mods = _effective(model, net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, *shape, generator=g, dtype=F64), torch.randint(0, 10, (5,), generator=g)
    grads, loss = make_algo("bp").step(net, x, y)
    want = nn.functional.cross_entropy(model(x), y)
    want.backward()
    assert close(loss[0], want.detach())[0]
    i = 0
    for m, layer in zip(mods, net.layers):
        for p, kind in zip(m.parameters(), layer.kinds()):
            ok, err = close(grads[i][0], p.grad * (layer.rule.multiplier if kind == "weight" else 1.0))
            assert ok, f"tensor {i} differs by {err:.3g}"
            i += 1
    assert i == len(grads)


def test_pc_with_fpa_one_step_is_bp_and_its_general_step_moves_every_tensor():
    """(1) PC with F-ini + FPA + sequential + T = 1 + kappa = 1/gamma gives e_l = delta_l and the BP gradient
    (gamma_L = 1) on VGG-5 (the identity of algos/pc/state.py); (2) PCX's inference (parallel, momentum, a fixed
    kappa, squared-error output, T = L - 1 so the output error reaches the first conv) runs on K = 2 replicas,
    gives finite gradients of every tensor's shape, and one AdamW step moves every tensor. Breaks if the adapter's
    conv units or pooled posts break PC's local messages."""
    shape, width = (1, 28, 28), 4
    net = ModuleNet(zoo.factory("vgg5", shape, "gelu"), shape, width, preset("sp", "adam"), K=2, seeds=[0, 1],
                    dtype=F64)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, *shape, generator=g, dtype=F64), torch.randint(0, 10, (6,), generator=g)
    bp, _ = make_algo("bp").step(net, x, y)
    pc, _ = make_algo("pc", inference="sequential", T=1, fpa=True).step(net, x, y)
    for a, b in zip(pc, bp, strict=True):
        assert close(a, b)[0]
    from mulocal.optim import LayerwiseOptimizer
    # T = 4 = L - 1: parallel inference moves the error one layer down per step, so it reaches the first conv
    rule = make_algo("pc", loss="mse", inference="parallel", T=4, kappa=0.1, momentum=0.3)
    grads, loss = rule.step(net, x, y)
    assert [tuple(t.shape) for t in grads] == [tuple(p.shape) for p in net.params()]
    assert all(torch.isfinite(t).all() for t in grads) and torch.isfinite(loss).all()
    before = [p.clone() for p in net.params()]
    LayerwiseOptimizer.for_net(net, [1e-3, 1e-3], "adam").step(grads)  # no decay: a tensor moves by its gradient
    assert all(not torch.equal(a, b) for a, b in zip(before, net.params()))


def _tiny(shape=(1, 28, 28), n=16):
    g = torch.Generator().manual_seed(0)
    return Dataset("tiny", torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g),
                   torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g), 10)


def test_the_cell_builds_the_zoo_net_and_refuses_another_depth_in_one_line():
    """``--arch vgg5`` (a cell) builds the adapter net with the cell's activation and bias; depth 3 (the default:
    not set) and 5 (its own) are accepted; any other depth is one ConfigError line naming the arch; an input the
    pools shrink to nothing is one line too. Breaks if the cell's activation, bias or depth is ignored."""
    run = assemble(default_cell(arch="vgg5", width=4, activation="tanh", bias=False), [0.1], [0], data=_tiny())
    assert isinstance(run.net, ModuleNet) and run.net.activation == "tanh" and run.net.depth == 5
    assert all(layer.bias is None for layer in run.net.layers)
    assemble(default_cell(arch="vgg5", width=4, depth=5), [0.1], [0], data=_tiny())
    run7 = assemble(default_cell(arch="vgg7", width=4), [0.1], [0], data=_tiny((3, 32, 32)))
    assert run7.net.depth == 7 and run7.net.input_shape == (3, 32, 32)
    for arch, depth in (("vgg5", 4), ("vgg7", 5)):
        with pytest.raises(ConfigError) as err:
            assemble(default_cell(arch=arch, width=4, depth=depth), [0.1], [0], data=_tiny())
        msg = str(err.value)
        assert "\n" not in msg and arch in msg and "depth" in msg
    with pytest.raises(ConfigError) as err:
        zoo.vgg5(4, (1, 8, 8))
    assert "\n" not in str(err.value) and "nothing" in str(err.value)


def test_pc_trains_vgg5_above_chance_on_a_fashion_mnist_subset(fmnist):
    """PC (PCX's inference: parallel, momentum; T = L - 1) with AdamW on 512 FashionMNIST images, 2 epochs at width
    8 (the base width: SP's numbers) through the cell path: test accuracy on 1000 images above 0.3. Chance is 0.1
    with a binomial sd of 0.0095 at 1000 images, so 0.3 is 20 sd above it. Breaks if the zoo net cannot learn
    under a local rule."""
    data = Dataset("fmnist-sub", fmnist.x_train[:512], fmnist.y_train[:512], fmnist.x_test[:1000],
                   fmnist.y_test[:1000], 10)
    cell = default_cell(arch="vgg5", width=8, base_width=8, activation="relu", algo="pc", optimizer="adam",
                        epochs=2, weight_decay=1e-3, weight_decay_mode="decoupled",
                        algo_options=dict(inference="parallel", T=4, kappa=0.1, momentum=0.3))
    from mulocal.train import Trainer
    torch.set_num_threads(1)  # small ops: a second thread on shared cores costs up to 20x here (conftest resets it)
    run = assemble(cell, [3e-3], [0], data=data)
    res = Trainer(run.net, run.algo, data, run.train, seeds=[0]).run()
    rows = [h for h in res["replicas"][0]["history"] if "event" not in h]
    assert rows[-1]["test_accuracy"] > 0.3


def test_a_vgg_cell_records_what_its_net_resolves_to():
    """config.resolved_algo on --arch vgg5 / vgg7 (part of the cell's hash): mupc's T is the net's number of weight
    layers (5, 7), not the depth field's default; trained conv feedback records its position mean (conv units above
    the first, as the CNN's)."""
    from mulocal.config import ZOO_ARCHS, default_cell, resolved_algo
    from mulocal.zoo import ZOO
    assert tuple(ZOO_ARCHS) == tuple(ZOO)
    for arch, layers in (("vgg5", 5), ("vgg7", 7)):
        res = resolved_algo(default_cell(algo="pc", arch=arch, algo_options={"inference": "mupc"}))
        assert res["T"] == layers
        assert resolved_algo(default_cell(algo="dtp", arch=arch))["conv_fb_loss"] == "position_mean"
