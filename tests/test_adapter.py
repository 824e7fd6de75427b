"""A user's own model (``mulocal.adapter``) against independent oracles.

* equivalence: the native MLP, CNN, ResMLP and ResCNN rewritten as plain ``nn.Sequential`` models (tests/
  models_user.py) run through the adapter give the native nets' weights (bitwise: same draws) and every rule's
  gradients and loss (1e-10 relative in float64; K = 2 replicas). The native nets are tested against written
  oracles elsewhere, so the adapter's affine path inherits them; a wrong role, fan-in, multiplier, residual flag or
  post module moves these numbers by O(1);
* general blocks (local autograd inside a module): BP's gradients equal autograd of the loss of the user's own
  ``nn.Module`` loaded with the same effective weights; PC's weight gradients at the solver's final state equal
  autograd of the PC energy written with the user's modules (F = sum_l gamma_l / 2 mean_b ||v_l - mu_l(v_{l-1})||^2 +
  gamma_L loss, mu_l the unit's forward, a residual unit's branch times d^-alpha);
* role reading: roles and fan-ins written by hand for Linear / Conv2d / a user's block (kernel area included, fan-in
  read on dim 1, residual blocks found by probing), and the refusals (one ConfigError line naming the layer);
* replicas: replica k of a batched general-block model equals a separate run of seed k.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models_user as U
from mulocal.adapter import ModuleNet, Residual
from mulocal.adapter.read import read
from mulocal.algos import make_algo
from mulocal.errors import ConfigError
from mulocal.nets import build
from mulocal.param import preset
from oracles import close

F64 = torch.float64


def _data(shape, B=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=F64), torch.randint(0, 10, (B,), generator=g)


NATIVE = [  # (arch, depth, width, factory)
    ("mlp", 3, 24, lambda w: U.mlp(w, 3)),
    ("mlp", 4, 24, lambda w: U.mlp(w, 4, nn.ReLU)),
    ("resmlp", 5, 24, lambda w: U.resmlp(w, 5)),
    ("cnn", 3, 6, lambda w: U.cnn(w, 3)),
    ("rescnn", 4, 6, lambda w: U.rescnn(w, 4)),
]
RULES = [("bp", {}), ("pc", {}), ("pc", {"inference": "parallel", "T": 3, "parallel_step": "gamma"}), ("pc", {"inference": "error"}),
         ("pc", {"inference": "sequential", "T": 2, "fpa": True}), ("gnt", {})]


@pytest.mark.parametrize("arch,depth,width,make", NATIVE, ids=[f"{a}{d}" for a, d, _, _ in NATIVE])
def test_native_nets_rewritten_as_sequential_give_the_native_numbers(arch, depth, width, make):
    """nn.Sequential rewrites of the native nets through the adapter: the same weights bitwise and the same
    gradients and loss for BP, PC (every solver) and GNT, K = 2. Breaks if a role, fan-in (kernel area), multiplier,
    bias rule, residual flag or post module is read wrong."""
    param = preset("mup", "sgd", base_width=4)
    act = "relu" if depth == 4 and arch == "mlp" else "tanh"
    nat = build(arch, (1, 28, 28), 10, width, param, depth=depth, activation=act, K=2, seeds=[0, 1], dtype=F64)
    ad = ModuleNet(make, (1, 28, 28), width, param, K=2, seeds=[0, 1], dtype=F64)
    assert ad.depth == nat.depth and ad.residual_net == nat.residual_net
    assert ad.rule_depth == nat.depth or not nat.residual_net  # d counts the residual blocks
    for a, b in zip(ad.params(), nat.params(), strict=True):
        assert torch.equal(a, b)
    x, y = _data((1, 28, 28))
    for name, opts in RULES:
        if name == "pc" and opts.get("inference") == "error" and not nat.residual_net:
            continue
        g_nat, l_nat = make_algo(name, **opts).step(nat, x, y)
        g_ad, l_ad = make_algo(name, **opts).step(ad, x, y)
        assert close(l_ad, l_nat)[0]
        for i, (p, q) in enumerate(zip(g_ad, g_nat, strict=True)):
            ok, err = close(p, q)
            assert ok, f"{name} {opts}: tensor {i} differs by {err:.3g}"
    assert [r["lr"] for r in _lr_table(ad)] == [r["lr"] for r in _lr_table(nat)]


def _lr_table(net):
    from mulocal.optim import lr_table
    return lr_table(net, 0.1)


# ---------------------------------------------------------------------------------------- general blocks
def _modules(model):
    from mulocal.adapter.read import flatten
    return flatten(model)


def _mults(layer):
    """Each tensor's width multiplier: the effective weight is tensor * mult (a ModuleLayer's ``mults``; a native
    layer's ``mult`` on its weight; a residual branch's multiplier is written in the forward instead)."""
    if hasattr(layer, "mults"):
        return layer.mults
    return [layer.rule.multiplier] + [1.0] * (len(layer.tensors()) - 1)


def _load(model, net, k):
    """The user's model with replica k's effective weights."""
    mods = dict(_modules(model))
    with torch.no_grad():
        for unit, layer in zip(net.units, net.layers):
            params = [p for _, p in mods[unit.name].named_parameters()]
            assert len(params) == len(layer.tensors())
            for p, t, m in zip(params, layer.tensors(), _mults(layer)):
                p.copy_(t[k] * m)
    return model


def _written_forward(model, net, x):
    """f of the user's model, each residual unit's branch scaled by its multiplier: v + alpha (block(v) - v)."""
    alphas = {u.name: (l.rule.branch if u.residual else None) for u, l in zip(net.units, net.layers)}
    h = x
    for name, m in _modules(model):
        a = alphas.get(name)
        h = m(h) if a is None else h + a * (m(h) - h)
    return h, None


def _user_model(make, width, net):
    torch.manual_seed(0)
    return _load(make(width).double(), net, 0)


def _compare(grads, model, net):
    """grads (replica 0) against the user's model's .grad: d/dtheta of f(mult theta) = mult * d/d(effective)."""
    mods = dict(_modules(model))
    i = 0
    for unit, layer in zip(net.units, net.layers):
        for (_, p), m in zip(mods[unit.name].named_parameters(), _mults(layer)):
            ok, err = close(grads[i][0], p.grad * m)
            assert ok, f"{unit.name}: tensor {i} differs by {err:.3g}"
            i += 1
    assert i == len(grads)


@pytest.mark.parametrize("make,width", [(U.resnet, 4), (U.vgg, 4)], ids=["resnet", "vgg"])
def test_bp_on_general_blocks_is_autograd_of_the_users_model(make, width):
    """BP through ModuleLayers (local vjp per unit, chained by backprop) equals autograd of the cross-entropy of
    the user's own module with the same effective weights (branch multiplier d^-alpha written in)."""
    param = preset("mup", "sgd", base_width=2)
    net = ModuleNet(make, (1, 28, 28), width, param, K=1, seeds=[5], dtype=F64)
    model = _user_model(make, width, net)
    x, y = _data((1, 28, 28))
    grads, loss = make_algo("bp").step(net, x, y)
    f, _ = _written_forward(model, net, x)
    want = nn.functional.cross_entropy(f, y)
    want.backward()
    assert close(loss[0], want.detach())[0]
    _compare(grads, model, net)


@pytest.mark.parametrize("inference", ["error", "sequential"])
def test_pc_weight_gradients_on_general_blocks_are_autograd_of_the_written_energy(inference):
    """PC on a user's residual conv net (two-conv blocks: local autograd inside each block): at the solver's final
    values v, grad theta = d/dtheta of F = sum_l gamma_l / 2 mean_b ||v_l - mu_l(v_{l-1})||^2 + gamma_L CE(mu_L), the
    energy written with the user's modules (gamma_l = d = 2 blocks here, the depth rule; mu_l of a block
    v + 2^-1/2 (block(v) - v))."""
    param = preset("mup", "sgd", base_width=2)
    net = ModuleNet(U.resnet, (1, 28, 28), 4, param, K=1, seeds=[2], dtype=F64)
    assert net.blocks == 2 and net.layers[1].scale == pytest.approx(2 ** -0.5)
    model = _user_model(U.resnet, 4, net)
    x, y = _data((1, 28, 28))
    pc = make_algo("pc", inference=inference, T=4)
    grads, _ = pc.step(net, x, y)
    v = [t[0] for t in pc._last[0]]  # v_0 (the input's activity) .. v_L
    named = _modules(model)
    mods = [m for _, m in named]
    units = [dict(named)[u.name] for u in net.units]
    gam = [2.0, 2.0, 2.0, param.gamma_L(4)]  # d = 2 residual blocks / (H_0 - 2) = 2: gamma_l = d^1
    pre = [m for m in mods[:mods.index(units[0])]]
    posts = []
    for a, b in zip(units, units[1:] + [None]):
        i = mods.index(a)
        j = mods.index(b) if b is not None else len(mods)
        posts.append(mods[i + 1:j])

    def seq(ms, h):
        for m in ms:
            h = m(h)
        return h
    a0 = seq(pre, x)
    E = 0
    for l, (unit, m) in enumerate(zip(net.units, units), start=1):
        a_prev = a0 if l == 1 else seq(posts[l - 2], v[l - 1])
        mu = a_prev + 2 ** -0.5 * (m(a_prev) - a_prev) if unit.residual else m(a_prev)
        if l < net.depth:
            E = E + gam[l - 1] / 2 * (v[l] - mu).pow(2).flatten(1).sum(1).mean()
        else:
            E = E + gam[-1] * nn.functional.cross_entropy(mu, y)
    E.backward()
    _compare(grads, model, net)


def test_general_block_replicas_equal_separate_runs():
    """Replica k of K = 3 (vmap over the stacked tensors) has the numbers of a K = 1 run with seed k (PC, error
    solver; BP): no replica mixing in functional_call / vmap."""
    param = preset("mup", "sgd", base_width=2)
    x, y = _data((1, 28, 28))
    many = ModuleNet(U.resnet, (1, 28, 28), 4, param, K=3, seeds=[4, 5, 6], dtype=F64)
    for name in ("bp", "pc"):
        g_all, l_all = make_algo(name).step(many, x, y)
        for k, s in enumerate([4, 5, 6]):
            one = ModuleNet(U.resnet, (1, 28, 28), 4, param, K=1, seeds=[s], dtype=F64)
            g_one, l_one = make_algo(name).step(one, x, y)
            assert close(l_all[k], l_one[0])[0]
            for a, b in zip(g_all, g_one):
                assert close(a[k], b[0])[0]


# ---------------------------------------------------------------------------------------- reading
def test_roles_and_fan_ins_are_read_from_two_widths():
    """Written by hand: conv weights (out, in, k, k) have fan-in in * k * k; the first conv is an input layer
    (fan-in 1 * 9 finite), convs between widths are hidden, the readout an output layer (fan-in w * s * s); biases
    of width-sized layers are vector-like, the readout's is finite; the user's Block is residual, a same-shape conv
    is not."""
    _, units, out = read(U.vgg, 8, (1, 28, 28), 4)
    assert out == (10,)
    roles = [(u.name, [(s.name, s.role, s.fan_in) for s in u.params]) for u in units]
    assert roles == [
        ("0", [("weight", "input", 9), ("bias", "vector", 1)]),
        ("3", [("weight", "hidden", 8 * 9), ("bias", "vector", 1)]),
        ("5", [("weight", "hidden", 16 * 9), ("bias", "vector", 1)]),
        ("9", [("weight", "hidden", 16 * 3 * 3), ("bias", "vector", 1)]),
        ("11", [("weight", "output", 8), ("bias", "vector-out", 1)]),
    ]
    assert not any(u.residual for u in units)
    _, units, _ = read(U.resnet, 8, (1, 28, 28), 4)
    assert [u.residual for u in units] == [False, True, True, False]
    assert [u.kind for u in units] == ["affine", "module", "module", "affine"]
    assert [s.fan_in for s in units[1].params] == [72, 1, 72, 1]
    _, units, _ = read(lambda w: U.rescnn(w, 4), 8, (1, 28, 28), 4)
    assert [(u.kind, u.residual, [type(m).__name__ for m in u.prefix]) for u in units] == [
        ("affine", False, []), ("affine", True, ["Tanh"]), ("affine", True, ["Tanh"]), ("affine", False, [])]


def test_a_readout_written_transposed_is_still_an_output_layer():
    """nn.Linear(w, 10) after nn.Linear(784, w): the readout's fan-in (dim 1 of its weight) is the width: output,
    not input (a transposed fan-in would swap them)."""
    _, units, _ = read(lambda w: U.mlp(w, 3), 8, (784,), 4)
    assert [u.role for u in units] == ["input", "hidden", "output"]
    assert [u.params[0].fan_in for u in units] == [784, 8, 8]


class _Norm(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin, self.norm = nn.Linear(w, w), nn.LayerNorm(w)

    def forward(self, x):
        return self.norm(self.lin(x))


@pytest.mark.parametrize("make,msg", [
    (lambda w: nn.Sequential(nn.Linear(4, w), nn.BatchNorm1d(w), nn.Linear(w, 3)), "layer 1 (BatchNorm1d)"),
    (lambda w: nn.Sequential(nn.Linear(4, w), nn.Dropout(0.1), nn.Linear(w, 3)), "layer 1 (Dropout)"),
    (lambda w: nn.Sequential(nn.Linear(4, w), nn.Linear(w, w + 3), nn.Linear(w + 3, 3)), "proportional"),
    (lambda w: nn.Sequential(nn.Linear(4, w), nn.MultiheadAttention(w, 2), nn.Linear(w, 3)), "MultiheadAttention"),
    (lambda w: nn.Sequential(nn.Linear(4, w), nn.Tanh(), Residual(nn.Linear(w, w)), nn.Linear(w, 3)),
     "between model layer 0 and the residual block 2"),
    (lambda w: nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)), "no width-dependent"),
    (lambda w: nn.Linear(4, w), "nn.Sequential"),
    (lambda w: nn.Sequential(nn.Linear(4, w)), "at least two units"),
    (lambda w: nn.Sequential(nn.Linear(4, w), _Norm(w), nn.Linear(w, 3), nn.Linear(3, w), nn.Linear(w, 3)),
     "layer 2 reads as an output layer between"),
])
def test_unsupported_models_are_refused_in_one_line(make, msg):
    with pytest.raises(ConfigError) as err:
        ModuleNet(make, (4,), 8, preset("mup", "sgd", base_width=4))
    assert msg in str(err.value) and "\n" not in str(err.value)


def test_shared_parameters_are_refused():
    def make(w):
        lin = nn.Linear(w, w)
        return nn.Sequential(nn.Linear(4, w), lin, nn.Tanh(), lin, nn.Linear(w, 3))
    with pytest.raises(ConfigError, match="same module as layer 1"):
        ModuleNet(make, (4,), 8, preset("mup", "sgd", base_width=4))


def test_a_norm_layer_runs_as_a_general_block_with_vector_like_gains():
    """LayerNorm inside a unit: its gain keeps the module's start value (1), its bias starts at 0, both take the
    vector-like learning rate (hidden biases' c_bias[0]); BP through it equals autograd of the user's model."""
    param = preset("mup", "sgd", base_width=4)
    make = lambda w: nn.Sequential(nn.Linear(6, w), nn.Tanh(), _Norm(w), nn.Tanh(), nn.Linear(w, 10))  # noqa: E731
    net = ModuleNet(make, (6,), 16, param, K=1, seeds=[1], dtype=F64)
    layer = net.layers[1]
    assert [s.role for s in layer.specs] == ["hidden", "vector", "vector", "vector"]
    assert torch.equal(layer.params[2][0], torch.ones(16, dtype=F64)) and not layer.params[3].any()
    m = 16 / 4
    assert layer.rule.bias_lr_scale == pytest.approx(m)  # c_bias[0] = -1 under muP with SGD
    model = _user_model(make, 16, net)
    x, y = _data((6,))
    grads, loss = make_algo("bp").step(net, x, y)
    f, _ = _written_forward(model, net, x)
    nn.functional.cross_entropy(f, y).backward()
    _compare(grads, model, net)


def test_depth_factors_count_residual_units_only():
    """A VGG-like stem with two plain hidden units and three residual blocks: d = 3 / (H_0 - 2), branch multiplier
    d^-1/2 on the blocks only, PC's hidden energy weights d (Parameterization.gamma_hidden at rule_depth = 5)."""
    def make(w):
        return nn.Sequential(nn.Linear(6, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w),
                             *[Residual(nn.Tanh(), nn.Linear(w, w)) for _ in range(3)], nn.Tanh(), nn.Linear(w, 3))
    param = preset("mup", "sgd", base_width=4)
    net = ModuleNet(make, (6,), 8, param, K=1, seeds=[0], dtype=F64)
    assert net.rule_depth == 5 and net.blocks == 3
    assert [getattr(l, "branch", 1.0) for l in net.layers] == pytest.approx([1, 1, 1] + [3 ** -0.5] * 3 + [1])
    assert make_algo("pc").energy_weights(net)[:-1] == pytest.approx([3.0] * 6)
    assert math.isclose(net.layers[3].rule.lr_scale, net.layers[1].rule.lr_scale)  # SGD, alpha = 1/2: c_H = 0


def test_parameters_shared_inside_blocks_are_refused():
    class Tied(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    def make(w):
        lin = nn.Linear(w, w)
        return nn.Sequential(nn.Linear(4, w), Tied(lin), nn.Tanh(), Tied(lin), nn.Linear(w, 3))
    with pytest.raises(ConfigError, match="same tensor"):
        ModuleNet(make, (4,), 8, preset("mup", "sgd", base_width=4))


TARGET_RULES = [("dtp", {}), ("tp", {}), ("dtp", {"feedback": "ridge"}), ("dtp", {"fb_loss": "drl"})]


@pytest.mark.parametrize("arch,depth,width,make", NATIVE, ids=[f"{a}{d}" for a, d, _, _ in NATIVE])
def test_target_propagation_on_the_rewritten_native_nets_gives_the_native_numbers(arch, depth, width, make):
    """TP / DTP (trainable, ridge, DRL feedback) on the nn.Sequential rewrites: the feedback built from the units
    (dense, upsampling conv, residual branches; phi read from the model's activation) is the native nets' -- same
    draws, same targets, same gradients (1e-10, float64, K = 2), two steps (the feedback trains in between)."""
    param = preset("mup", "sgd", algo="dtp", base_width=4)
    act = "relu" if depth == 4 and arch == "mlp" else "tanh"
    x, y = _data((1, 28, 28))
    for name, opts in TARGET_RULES:
        nat = build(arch, (1, 28, 28), 10, width, param, depth=depth, activation=act, K=2, seeds=[0, 1], dtype=F64)
        ad = ModuleNet(make, (1, 28, 28), width, param, K=2, seeds=[0, 1], dtype=F64)
        r_nat, r_ad = make_algo(name, noise_rng="host", **opts), make_algo(name, noise_rng="host", **opts)
        for _ in range(2):
            g_nat, l_nat = r_nat.step(nat, x, y)
            g_ad, l_ad = r_ad.step(ad, x, y)
            assert close(l_ad, l_nat)[0]
            for i, (p, q) in enumerate(zip(g_ad, g_nat, strict=True)):
                ok, err = close(p, q)
                assert ok, f"{name} {opts}: tensor {i} differs by {err:.3g}"


def test_target_propagation_refuses_units_without_a_feedback_map_in_one_line():
    """A general unit that is not a residual block (a Linear + LayerNorm module) has no built feedback: DTP says
    which unit, and that ridge feedback (a regression on the activities) or BP / PC run on it."""
    make = lambda w: nn.Sequential(nn.Linear(6, w), nn.Tanh(), _Norm(w), nn.Tanh(), nn.Linear(w, 10))  # noqa: E731
    net = ModuleNet(make, (6,), 8, preset("mup", "sgd", base_width=4), K=1, dtype=F64)
    x, y = _data((6,))
    with pytest.raises(ConfigError) as err:
        make_algo("dtp").step(net, x, y)
    assert "model layer 2 (_Norm)" in str(err.value) and "\n" not in str(err.value)
    grads, _ = make_algo("dtp", feedback="ridge").step(net, x, y)  # ridge feedback runs: every tensor gets a signal
    assert all(torch.isfinite(g).all() and g.abs().amax() > 0 for g in grads)


def test_dtp_on_general_residual_blocks_trains_the_stream_feedback_branch():
    """DTP on the user's two-conv residual blocks: each block's feedback is the stream's own branch h + a (conv(V,
    phi(h)) + c) (kernel 3, the block's depth factors), the same feedback as the native residual CNN's; its
    reconstruction loss falls over a few feedback-training steps on one batch (it learns to invert the block)."""
    net = ModuleNet(U.resnet, (1, 28, 28), 4, preset("mup", "sgd", algo="dtp", base_width=2), K=1, dtype=F64)
    x, y = _data((1, 28, 28), B=16)
    rule = make_algo("dtp", noise_rng="host", record=True, fb_iters=1)
    losses = []
    for _ in range(6):
        rule.step(net, x, y)
        losses.append(float(rule.fb_stats["fb_loss_2"][0]))
    from mulocal.algos.tp import ConvFeedbackBranch
    assert isinstance(rule.fb[2], ConvFeedbackBranch) and rule.fb[2].branch == pytest.approx(2 ** -0.5)
    assert losses[-1] < losses[0]


def test_coordinate_check_terms_of_a_general_block_are_its_changes_written_with_the_users_module():
    """What coord reads for a general block (the user's two-conv Block, branch multiplier 2^-1/2): its own update
    g(a(t); theta(t)) - g(a(t); theta(0)) and W(0) Delta a generalised, g(a(t); theta(0)) - g(a(0); theta(0)), with
    g(v) = 2^-1/2 (block(v) - v) written with copies of the user's module holding the start / current weights. Breaks
    if either reads the wrong weights or input (the own update leaking into the input's term)."""
    import copy
    param = preset("mup", "sgd", base_width=2)
    net = ModuleNet(U.resnet, (1, 28, 28), 4, param, K=1, seeds=[0], dtype=F64)
    layer, unit = net.layers[1], net.units[1]
    start = [t.clone() for t in layer.tensors()]
    x, y = _data((1, 28, 28))
    a0 = net.forward(x)[1][1]
    grads, _ = make_algo("bp").step(net, x, y)
    for t, g in zip(net.params(), grads):
        t.sub_(0.5 * g)
    a1 = net.forward(x)[1][1]

    def block(tensors):
        m = copy.deepcopy(unit.module).double()
        with torch.no_grad():
            for p, t in zip(m.parameters(), tensors):
                p.copy_(t[0])
        return lambda v: 2 ** -0.5 * (m(v[0]) - v[0])
    with torch.no_grad():
        g_now, g_start = block(layer.tensors()), block(start)
        assert close(layer.own_change(a1, start)[0], g_now(a1) - g_start(a1))[0]
        assert close(layer.input_change(a1, a0, start)[0], g_start(a1) - g_start(a0))[0]


def test_a_users_plain_mlp_takes_pcs_fused_parallel_step():
    """The fused parallel PC step (algos/pc/fused.py) applies to a user's Linear/Tanh MLP as to nets.MLP (the same
    numbers: the equivalence test above runs it), and not to a model with a LayerNorm unit or mixed activations."""
    pc = make_algo("pc", inference="parallel", T=2)
    param = preset("mup", "sgd", base_width=4)
    net = ModuleNet(lambda w: U.mlp(w, 4), (1, 28, 28), 8, param)
    pc._resolve(net, 4)
    assert net.plain_mlp and pc.fused(net)
    mixed = ModuleNet(lambda w: nn.Sequential(nn.Flatten(), nn.Linear(784, w), nn.Tanh(), nn.Linear(w, w), nn.ReLU(),
                                              nn.Linear(w, 10)), (1, 28, 28), 8, param)
    norm = ModuleNet(lambda w: nn.Sequential(nn.Linear(6, w), nn.Tanh(), _Norm(w), nn.Tanh(), nn.Linear(w, 10)), (6,),
                     8, param)
    assert not mixed.plain_mlp and not norm.plain_mlp
