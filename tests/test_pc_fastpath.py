"""PC's exact shortcuts in the state solver (``algos/pc/state.py``, ``SHORTCUTS``) change no number.

* ``Net.post_lin``: a post and its linearization from one evaluation (a pooled post is not recomputed inside the
  vjp that linearizes it): the activity equals ``post`` bitwise and the map equals autograd's vjp of ``post``;
* the parallel wavefront from F-ini (``state.front``): step t moves only the layers the top error has reached.

The reference is the same solver with ``SHORTCUTS = False``, which runs the plain schedule: every layer moved,
every prediction recomputed, every J_l linearized afresh at each use (the code before the shortcuts; the autograd
oracle of tests/test_oracle_pc.py checks that solver). Native MLP, CNN, ResMLP, ResCNN and PCX's VGG-5 through the
adapter (GELU and ReLU, every post pooled), K = 2, float64, two training steps (the bound step's power iteration
warm-starts across them): weight gradients, final values, losses and the inference status agree to 1e-12
relative. If the wavefront skipped a layer that moves, a cached J_l outlived its v_l, or a skipped error was not
exactly 0, these comparisons fail. The call counts pin that the shortcuts are taken.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from mulocal import posts, zoo
from mulocal.adapter import ModuleNet
from mulocal.algos.pc import PC
from mulocal.algos.pc import state
from mulocal.nets import build
from mulocal.param import preset

F64 = torch.float64
RTOL = 1e-12
NETS = ["mlp", "cnn", "resmlp", "rescnn", "vgg5-gelu", "vgg5-relu"]


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """Tiny float64 convolutions: one thread (two wait on each other when other jobs hold the cores, 100x here)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


def _net(name: str):
    gen = torch.Generator().manual_seed(5)
    if name.startswith("vgg5"):
        shape = (1, 28, 28)
        net = ModuleNet(zoo.factory("vgg5", shape, name.split("-")[1]), shape, 2, preset("mup", "adam", base_width=4),
                        K=2, seeds=[0, 1], dtype=F64)
    else:
        shape = (7,) if name in ("mlp", "resmlp") else (1, 8, 8)
        p = preset("mup", "sgd", base_width=4).with_(a=(0.0, 0.25, 0.5))
        net = build(name, shape, 5, 6, p, depth=4, activation="tanh" if name != "cnn" else "relu", K=2,
                    seeds=[3, 4], dtype=F64)
    with torch.no_grad():  # non-zero biases
        for layer in net.layers:
            for t in layer.tensors()[1:]:
                t.copy_(0.3 * torch.randn(t.shape, generator=gen, dtype=F64))
    x = torch.randn(3, *shape, generator=gen, dtype=F64)
    y = torch.randint(0, net.out_dim, (3,), generator=gen)
    return net, x, y


def _run(net, x, y, shortcuts: bool, monkeypatch, **kw):
    """Two PC.step calls on the state solver (the MLP's fused path off): grads, losses, values, status, stats."""
    algo = PC(loss=kw.pop("loss", "mse"), **kw)
    with monkeypatch.context() as m:
        m.setattr("mulocal.algos.pc.rule.fused_applies", lambda pc, net: False)
        m.setattr(state, "SHORTCUTS", shortcuts)
        out = [algo.step(net, x, y) for _ in range(2)]
    v, _ = algo._last
    return ([g for gs, _ in out for g in gs], [loss for _, loss in out], list(v[1:]), algo.inference_status(),
            algo.stats)


def _same(new, ref, what):
    assert len(new) == len(ref), what
    for i, (p, q) in enumerate(zip(new, ref)):
        assert p.shape == q.shape, (what, i)
        scale = q.abs().max().clamp_min(1e-300)
        assert (p - q).abs().max() <= RTOL * scale, (what, i, float((p - q).abs().max() / scale))


def _check(net, x, y, monkeypatch, **kw):
    new = _run(net, x, y, True, monkeypatch, **kw)
    ref = _run(net, x, y, False, monkeypatch, **kw)
    for what, a, b in zip(("gradient", "loss", "value"), new[:3], ref[:3]):
        _same(a, b, what)
    assert new[3].keys() == ref[3].keys()
    for key in new[3]:
        assert new[3][key] == pytest.approx(ref[3][key], rel=RTOL, abs=1e-300, nan_ok=True), key
    for key in ("energy", "residual"):
        if key in ref[4]:
            _same([new[4][key]], [ref[4][key]], key)
    return new


# every net x T x momentum x (status on, status off, guard with a step large enough to backtrack)
CASES = list(itertools.product(NETS, (1, 3, 7), (0.0, 0.3), ("status", "no-status", "guard")))


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_shortcuts_equal_the_plain_parallel_solver(case, monkeypatch):
    name, T, mom, opt = case
    net, x, y = _net(name)
    kw = dict(T=T, inference="parallel", momentum=mom, no_status=opt == "no-status", guard=opt == "guard",
              kappa=3.0 if opt == "guard" else 0.2)
    out = _check(net, x, y, monkeypatch, **kw)
    if opt == "guard" and T == 7 and mom == 0.3:  # the guard's undo is exercised (a restored state mixed in)
        assert max(out[3]["backtracks"]) > 0


OTHER = [  # options where only post_lin applies (or the wavefront with frozen predictions: FPA)
    dict(T=3, inference="parallel", fpa=True, kappa=0.2),
    dict(T=3, inference="parallel", init="zero", kappa=0.2, momentum=0.3),
    dict(T=3, inference="sequential", kappa=0.2),
    dict(T=3, inference="sequential", guard=True, kappa=3.0),
    dict(T=2, inference="parallel", record=True, kappa=0.2, loss="ce"),
    dict(T=3, inference="parallel", tol=1e-30, kappa=0.2, parallel_step="bound"),
    dict(T=3, inference="parallel"),  # the default step: the curvature bound
    dict(inference="mupc", momentum=0.3),  # muPC's recipe: parallel steps, T = depth
]


@pytest.mark.parametrize("name", ["cnn", "rescnn", "vgg5-gelu"])
@pytest.mark.parametrize("kw", OTHER, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_shortcuts_equal_the_plain_solver_under_other_options(name, kw, monkeypatch):
    net, x, y = _net(name)
    _check(net, x, y, monkeypatch, **dict(kw))


def test_incremental_updates_equal_the_plain_solver(monkeypatch):
    """Incremental PC moves the weights after each inference step: the wavefront is off, post_lin still applies."""
    from mulocal.optim import LayerwiseOptimizer

    def train(shortcuts):
        net, x, y = _net("vgg5-relu")
        algo = PC(loss="mse", T=3, inference="parallel", kappa=0.2, incremental=True)
        opt = LayerwiseOptimizer.for_net(net, 0.05, "sgd")
        with monkeypatch.context() as m:
            m.setattr(state, "SHORTCUTS", shortcuts)
            grads, _ = algo.step(net, x, y, opt=opt)
        return grads + net.params()

    _same(train(True), train(False), "incremental")


@pytest.mark.parametrize("name", NETS)
def test_post_lin_is_post_and_its_autograd_vjp(name):
    net, x, _ = _net(name)
    us, acts = net.forward(x)
    gen = torch.Generator().manual_seed(9)
    for l in range(1, net.depth):
        u = us[l] + 0.1 * torch.randn(us[l].shape, generator=gen, dtype=F64)  # off the forward pass's ties
        a, jac = net.post_lin(l, u)
        assert torch.equal(a, net.post(l, u)), l
        g = torch.randn(a.shape, generator=gen, dtype=F64)
        w = u.clone().requires_grad_(True)
        with torch.enable_grad():
            ref, = torch.autograd.grad(net.post(l, w), w, g)
        _same([jac(g)], [ref], f"vjp {l}")
        _same([jac(g)], [net.linearize(l, u, a)(g)], f"linearize {l}")


def test_forward_with_lin_from_is_forward():
    net, x, _ = _net("vgg5-gelu")
    us, acts = net.forward(x)
    us2, acts2, jacs = net.forward(x, lin_from=2)
    assert all(torch.equal(p, q) for p, q in zip(us + acts, us2 + acts2))
    assert jacs[:2] == [None, None] and all(j is not None for j in jacs[2:])


def test_front_is_the_wavefront():
    """After s parallel steps from F-ini only e_L and the errors of the s layers below the top can be nonzero."""
    L = 5
    assert [state.front(s, L) for s in range(7)] == [5, 4, 3, 2, 1, 1, 1]


def _counts(monkeypatch, shortcuts, T, status=True):
    """Evaluations of the hidden posts, predictions and W^T e products in one PC step of VGG-5."""
    net, x, y = _net("vgg5-gelu")
    n = {"post": 0, "predict": 0, "back": 0}
    post, predict = net.post, net.predict

    def count(key, fn):
        def wrapped(*a, **k):
            n[key] += 1
            return fn(*a, **k)
        return wrapped

    def hidden_post(l, u):  # the vjps call net.post too (the input's post, l = 0, is not counted)
        n["post"] += l > 0
        return post(l, u)

    monkeypatch.setattr(net, "post", hidden_post)
    monkeypatch.setattr(net, "predict", count("predict", predict))
    for layer in net.layers:
        monkeypatch.setattr(layer, "backward_input", count("back", layer.backward_input))
    monkeypatch.setattr(posts, "post_vjp", count("post", posts.post_vjp))  # a pooled post's vjp, written out
    monkeypatch.setattr(state, "SHORTCUTS", shortcuts)
    PC(loss="mse", T=T, inference="parallel", kappa=0.1, momentum=0.3, no_status=not status).step(net, x, y)
    return n


def test_the_shortcuts_are_taken(monkeypatch):
    """VGG-5 (L = 5, 4 pooled posts), T = 7: the wavefront moves 1, 2, 3, 4, 4, 4, 4 layers (22 moves instead of
    28); each post is evaluated once per move (its vjp included) plus the 4 feed-forward ones: 26 instead of 4 +
    4 * 7 posts + 7 * 4 vjp forwards + 4 for the final residual = 64; predictions 5 + 22 instead of 5 + 28; W^T e
    22 + 4 (the final residual) instead of 28 + 4."""
    assert _counts(monkeypatch, True, 7) == {"post": 26, "predict": 27, "back": 26}
    assert _counts(monkeypatch, False, 7) == {"post": 64, "predict": 33, "back": 32}
    # T = 1 without the status: the forward, one move of the top hidden layer, no J_l kept past it
    assert _counts(monkeypatch, True, 1, status=False) == {"post": 5, "predict": 6, "back": 1}


@pytest.mark.parametrize("name", NETS)
def test_bp_with_the_forward_linearizations_equals_bp_linearizing_in_its_backward(name):
    """BP takes each post's linearization from the forward (``Net.forward(x, lin_from=1)``, one evaluation of a
    pooled post): its gradients equal, bitwise, the backward that linearizes at (u_l, a_l) itself (BP.step against
    autograd: tests/test_identities.py, test_contracts.py, test_depth_rules.py, test_adapter.py)."""
    from mulocal.algos.bp import BP, backprop
    from mulocal.losses import loss_and_grad
    net, x, y = _net(name)
    grads, loss = BP(loss="ce").step(net, x, y)
    us, acts = net.forward(x)
    ref_loss, delta = loss_and_grad(us[-1], y, "ce")
    assert torch.equal(loss, ref_loss)
    ref = backprop(net, us, acts, delta)
    assert len(grads) == len(ref)
    for p, q in zip(grads, ref):
        assert torch.equal(p, q)
