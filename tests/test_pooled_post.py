"""The pooled posts written out (``mulocal.posts``: a = [flatten](pool(act(u))) and its pullback) change no number.

Identities (tier "identities" of tests/README.md):

* bitwise: the activity ``post``, and ``post_lin``'s activity and pullback, with ``posts.FAST`` on equal the plain
  path's (the post's modules, or the native net's ``_pool(phi(u))``, and ``torch.func.vjp`` through them) bit for bit
  (compared as integers, so -0.0 against 0.0 and NaN payloads count), with the same strides, for GELU (exact and
  tanh), ReLU, Tanh, Hardtanh and Identity before 2 x 2 max or average pooling, a 2 x 3 and a 3 x 3 kernel, a
  divisor override, with and without the Flatten, on a user's model, PCX's VGG-5 (``zoo``) and the native CNN and
  ResCNN, in float32 and float64, on inputs full of ties (whole windows equal, repeated values, ReLU's zeros) and
  NaNs. If the channels-last pooling picked another maximum of a window than the contiguous kernel, or the
  pullback ran another kernel or layout than autograd, these fail;
* autograd oracle: the same pullback equals float64 autograd of the post written out here (the activation's formula,
  the windows by reshaping, the max as a gather at ``argmax``'s first maximum) to rounding;
* whole steps: PC (PCX's parallel inference with momentum, and the default sequential step) and BP followed by Adam,
  twice, on a small VGG-5 and native CNNs: every parameter bitwise the same with the fast path on and off;
* fallback: posts of another form (padding, stride != kernel, dilation, ceil mode, pool before the activation, an
  in-place activation) are not written out, go through ``torch.func.vjp`` and give float64 autograd's numbers.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mulocal import posts, zoo
from mulocal.errors import ConfigError
from mulocal.adapter import ModuleNet
from mulocal.algos.bp import BP
from mulocal.algos.pc import PC
from mulocal.nets import CNN, ResCNN
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset

F32, F64 = torch.float32, torch.float64
SIDE = 9  # odd: floor pooling drops the last row and column
ACTS = {  # name: (module factory, the activation written out, for the oracle)
    "gelu": (nn.GELU, lambda y: 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))),
    "gelu-tanh": (lambda: nn.GELU(approximate="tanh"),
                  lambda y: 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))),
    "relu": (nn.ReLU, lambda y: torch.where(y > 0, y, 0 * y)),  # relu'(0) = 0, as threshold_backward
    "tanh": (nn.Tanh, torch.tanh),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 0.75),  # derivative 0 at the bounds (hardtanh_backward)
                 lambda y: torch.where((y > -0.5) & (y < 0.75), y, torch.where(y <= -0.5, -0.5 + 0 * y, 0.75 + 0 * y))),
    "identity": (nn.Identity, lambda y: y),
}
POOLS = {  # name: (module factory, kind, kernel, divisor)
    "max2": (lambda: nn.MaxPool2d(2), "max", (2, 2), None),
    "avg2": (lambda: nn.AvgPool2d(2), "avg", (2, 2), None),
    "max2x3": (lambda: nn.MaxPool2d((2, 3)), "max", (2, 3), None),
    "max3": (lambda: nn.MaxPool2d(3, stride=3), "max", (3, 3), None),
    "avg2-div3": (lambda: nn.AvgPool2d(2, divisor_override=3), "avg", (2, 2), 3),
}
CASES = [(a, p) for a in ACTS for p in ("max2", "avg2")] + [("gelu", p) for p in ("max2x3", "max3", "avg2-div3")] \
    + [("relu", "max3")]


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """Tiny float64 convolutions: one thread (two wait on each other when other jobs hold the cores)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64 if t.dtype == F64 else torch.int32)


def _same_bits(p: torch.Tensor, q: torch.Tensor, what) -> None:
    assert p.shape == q.shape and p.dtype == q.dtype, what
    assert torch.equal(_bits(p), _bits(q)), (what, float((p - q).abs().nan_to_num().max()))
    # strides of dimensions of size 1 carry no layout
    assert [s for s, n in zip(p.stride(), p.shape) if n > 1] == [s for s, n in zip(q.stride(), q.shape) if n > 1], \
        (what, p.stride(), q.stride())


def _ties(shape, dtype, gen, nan: bool = False) -> torch.Tensor:
    """Half the entries from {-1.5, -1, ..., 1.5} (ties in most windows, zeros for ReLU, Hardtanh's bound -0.5),
    half normal; the top-left 3 x 3 corner of every map one value (whole windows tied); ``nan``: a few NaNs."""
    coarse = torch.randint(-3, 4, shape, generator=gen).to(dtype) / 2
    u = torch.where(torch.rand(shape, generator=gen) < 0.5, coarse, torch.randn(shape, generator=gen, dtype=dtype))
    u[..., :3, :3] = 0.5
    if nan:
        u[torch.rand(shape, generator=gen) < 0.05] = float("nan")
    return u


def _model(act: str, pool: str, side: int = SIDE):
    """A user's model: conv -> act -> pool -> conv -> act -> pool -> Flatten -> Linear (posts 1 and 2 pooled, the
    second flattened)."""
    make_act, make_pool = ACTS[act][0], POOLS[pool][0]
    kh, kw = POOLS[pool][2]

    def make(width):
        h, w = side // kh // kh, side // kw // kw
        return nn.Sequential(nn.Conv2d(2, width, 3, padding=1), make_act(), make_pool(),
                             nn.Conv2d(width, width, 3, padding=1), make_act(), make_pool(), nn.Flatten(),
                             nn.Linear(width * h * w, 3))
    return make


def _module_net(make, shape, dtype, width=4):
    return ModuleNet(make, shape, width, preset("mup", "adam", base_width=2), K=2, seeds=[0, 1], dtype=dtype)


def _plain(net, l, u):
    """The plain path: torch.func.vjp of the post (posts.FAST off)."""
    old, posts.FAST = posts.FAST, False
    try:
        a, vjp = torch.func.vjp(lambda w: net.post(l, w), u)
    finally:
        posts.FAST = old
    return a, lambda g: vjp(g)[0]


def _check_bitwise(net, l, u, gen, monkeypatch):
    """post and post_lin (FAST, torch.func.vjp never called) bitwise the plain path's; returns the pullback."""
    a_ref, back_ref = _plain(net, l, u)
    with monkeypatch.context() as m:
        m.setattr(torch.func, "vjp", lambda *a, **k: pytest.fail("the written-out post fell back to torch.func.vjp"))
        a, back = net.post_lin(l, u)
        a_post = net.post(l, u)
        lin = net.linearize(l, u)
    _same_bits(a, a_ref, ("post_lin activity", l))
    _same_bits(a_post, a_ref, ("post", l))
    for g in (_ties(a_ref.shape, u.dtype, gen) if a_ref.dim() == 5 else torch.randn(a_ref.shape, generator=gen,
                                                                                       dtype=u.dtype),
              torch.full(a_ref.shape, -0.0, dtype=u.dtype)):
        ref = back_ref(g)
        _same_bits(back(g), ref, ("pullback", l))
        _same_bits(lin(g), ref, ("linearize", l))
    return back


def _written(act: str, pool: str, flatten: bool, u: torch.Tensor) -> torch.Tensor:
    """The post written out from its definition: act by formula, k x k windows by reshaping, max = the entry at
    argmax's first maximum in row-major window order (autograd routes g there), avg = window sum / (k^2 or the
    divisor)."""
    _, kind, (kh, kw), divisor = POOLS[pool]
    K, B, C, H, W = u.shape
    z = ACTS[act][1](u.reshape(K * B, C, H, W))
    oh, ow = H // kh, W // kw
    win = z[..., :oh * kh, :ow * kw].reshape(K * B, C, oh, kh, ow, kw).permute(0, 1, 2, 4, 3, 5)
    win = win.reshape(K * B, C, oh, ow, kh * kw)
    if kind == "max":
        p = win.gather(-1, win.argmax(-1, keepdim=True)).squeeze(-1)
    else:
        p = win.sum(-1) / (divisor or kh * kw)
    a = p.reshape(K, B, C, oh, ow)
    return a.flatten(2) if flatten else a


def _check_oracle(back, act, pool, flatten, u, gen):
    """The pullback (float64) = autograd of the written-out post, to rounding."""
    w = u.detach().clone().requires_grad_(True)
    a = _written(act, pool, flatten, w)
    g = torch.randn(a.shape, generator=gen, dtype=F64)
    (ref,) = torch.autograd.grad(a, w, g)
    got = back(g)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max().clamp_min(1.0), float((got - ref).abs().max())


@pytest.mark.parametrize("act,pool", CASES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_user_model_pooled_posts_are_bitwise_the_vjp_and_the_written_post(act, pool, dtype, monkeypatch):
    """User model conv -> act -> pool (-> Flatten): both posts are written out (``_pooled``) and give torch.func.vjp's
    activity and pullback bit for bit, ties and NaNs included; in float64 the pullback is autograd of the post
    written out here. A channels-last pooling that picked another maximum, a missed Flatten, GELU's approximate
    dropped or an activation's backward at the wrong tensor fails here."""
    gen = torch.Generator().manual_seed(11)
    net = _module_net(_model(act, pool), (2, SIDE, SIDE), dtype)
    for l in (1, 2):
        assert net._pooled(l) is not None, l
        for nan in (False, True):
            u = _ties((2, 3, *net._u_shapes[l]), dtype, gen, nan=nan)
            back = _check_bitwise(net, l, u, gen, monkeypatch)
            if dtype == F64 and not nan:
                _check_oracle(back, act, pool, l == 2, u, gen)


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("width", [2, 16])  # 16: 16-128 channels, the kernels' vectorized loops (not only their tails)
def test_vgg5_posts_are_bitwise_the_vjp(act, width, monkeypatch):
    """PCX's VGG-5 (``zoo``, 28 x 28 -> 14 -> 7 -> 3 -> 1: the 7 x 7 map pooled with its last row and column
    dropped, the last post flattened): every post written out, bitwise torch.func.vjp's, float32 and float64."""
    gen = torch.Generator().manual_seed(12)
    for dtype in (F32, F64):
        net = _module_net(zoo.factory("vgg5", (1, 28, 28), act), (1, 28, 28), dtype, width=width)
        for l in range(1, net.depth):
            assert net._pooled(l) == posts.Pooled(act, "max", (2, 2), flatten=l == net.depth - 1), l
            _check_bitwise(net, l, _ties((2, 3, *net._u_shapes[l]), dtype, gen), gen, monkeypatch)


@pytest.mark.parametrize("activation", ["tanh", "relu", "linear"])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_native_cnn_and_rescnn_posts_are_bitwise_the_vjp_and_the_written_post(activation, pool, monkeypatch):
    """The native CNN (every post ``_pool(phi(u))``, the last flattened) and ResCNN (only its last post pooled: the
    others stay phi(u) and are not written out), float32 and float64: bitwise torch.func.vjp's, and in float64
    autograd of the written post."""
    gen = torch.Generator().manual_seed(13)
    act = {"linear": "identity"}.get(activation, activation)
    for dtype in (F32, F64):
        p = preset("mup", "sgd", base_width=2)
        cnn = CNN((1, SIDE, SIDE), 4, 3, 3, p, activation, K=2, seeds=[0, 1], pool=pool, dtype=dtype)
        res = ResCNN((1, 12, 12), 4, 3, 4, p, activation, K=2, seeds=[0, 1], pool=pool, dtype=dtype)
        for net, pooled in ((cnn, (1, 2)), (res, (3,))):
            for l in range(1, net.depth):
                spec = net._pooled(l)
                if l not in pooled:
                    assert spec is None and not net._needs_vjp(l)
                    continue
                assert spec == posts.Pooled(activation, pool, (2, 2), flatten=l == net.depth - 1)
                shape = (2, 3, *_value_shape(net, l))
                u = _ties(shape, dtype, gen)
                back = _check_bitwise(net, l, u, gen, monkeypatch)
                if dtype == F64:
                    _check_oracle(back, act, pool + "2", l == net.depth - 1, u, gen)


def _value_shape(net, l):
    """(C, H, W) of u_l of a native conv net."""
    with torch.no_grad():
        us, _ = net.forward(torch.zeros(1, *net.input_shape, dtype=net.dtype))
    return tuple(us[l].shape[2:])


# ------------------------------------------------------------------------------------------- whole steps
def _nets(name: str):
    if name.startswith("vgg5"):
        act = name.split("-")[1]
        return lambda: _module_net(zoo.factory("vgg5", (1, 28, 28), act), (1, 28, 28), F32, width=4), (1, 28, 28)
    activation, pool = name.split("-")[1:]
    p = preset("mup", "adam", base_width=2)
    return (lambda: CNN((1, 12, 12), 4, 10, 3, p, activation, K=2, seeds=[0, 1], pool=pool)), (1, 12, 12)


def _train(make, shape, rule, fast: bool, steps: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(14)
    old, posts.FAST = posts.FAST, fast
    try:
        net = make()
        opt = LayerwiseOptimizer.for_net(net, [1e-2] * net.K, "adam", weight_decay=1e-2,
                                         weight_decay_mode="decoupled")
        for _ in range(steps):
            x = torch.randn(8, *shape, generator=gen)
            y = torch.randint(0, net.out_dim, (8,), generator=gen)
            grads, _ = rule().step(net, x, y)
            opt.step(grads)
    finally:
        posts.FAST = old
    return net.params()


@pytest.mark.parametrize("name", ["vgg5-gelu", "vgg5-relu", "cnn-relu-max", "cnn-tanh-avg"])
@pytest.mark.parametrize("algo", ["pc-pcx", "pc", "bp"])
def test_training_steps_are_bitwise_those_of_the_vjp_path(name, algo):
    """Two training steps (PC with PCX's parallel inference and momentum, PC's default sequential step, or BP; then
    AdamW), float32: every parameter bitwise the same with the pooled posts written out and through torch.func.vjp.
    Anything the written-out path computes differently (a value, a layout a later kernel rounds by) shows here."""
    make, shape = _nets(name)
    rule = {"pc-pcx": lambda: PC(loss="mse", T=4, inference="parallel", kappa=0.02 / 8, momentum=0.3),
            "pc": lambda: PC(loss="mse"), "bp": lambda: BP(loss="mse")}[algo]
    fast, plain = _train(make, shape, rule, True), _train(make, shape, rule, False)
    for i, (p, q) in enumerate(zip(fast, plain)):
        _same_bits(p, q, (name, algo, i))


# ------------------------------------------------------------------------------------------- what is written out
@pytest.mark.parametrize("mods,want", [
    ([nn.GELU(approximate="tanh"), nn.MaxPool2d(2), nn.Flatten()],
     posts.Pooled("gelu", "max", (2, 2), flatten=True, approximate="tanh")),
    ([nn.MaxPool2d(2, stride=2)], posts.Pooled("linear", "max", (2, 2))),
    ([nn.Tanh(), nn.AvgPool2d((2, 3), count_include_pad=False)],
     posts.Pooled("tanh", "avg", (2, 3), count_include_pad=False)),
    ([nn.ReLU(inplace=True), nn.MaxPool2d(2)], None),  # in place: the plain path keeps writing into u
    ([nn.ReLU6(), nn.MaxPool2d(2)], None),  # a Hardtanh subclass, not Hardtanh
    ([nn.SiLU(), nn.MaxPool2d(2)], None),
    ([nn.MaxPool2d(2), nn.ReLU()], None),  # pool before the activation
    ([nn.ReLU(), nn.Tanh(), nn.MaxPool2d(2)], None),
    ([nn.ReLU(), nn.MaxPool2d(2, padding=1)], None),
    ([nn.ReLU(), nn.MaxPool2d(3, stride=2)], None),
    ([nn.ReLU(), nn.MaxPool2d(2, dilation=2)], None),
    ([nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)], None),
    ([nn.ReLU(), nn.MaxPool2d(2, return_indices=True)], None),
    ([nn.ReLU(), nn.AvgPool2d(2, stride=1)], None),
    ([nn.ReLU(), nn.AvgPool2d(2, padding=1)], None),
    ([nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(2)], None),
    ([nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Tanh()], None),
    ([nn.ReLU()], None),
    ([], None),
])
def test_which_posts_are_written_out(mods, want):
    """Only [act,] pool(kernel = stride, no padding, dilation 1, floor) [, Flatten()] is written out; anything else
    (the fallback) keeps the plain path. A post read as pooled that is not would give wrong numbers silently."""
    assert posts.from_modules(mods) == want


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2, padding=1), nn.MaxPool2d(3, stride=2), nn.AvgPool2d(2, stride=1),
                                  nn.MaxPool2d(2, ceil_mode=True)])
def test_unsupported_posts_fall_back_to_the_vjp_with_autograd_numbers(pool, monkeypatch):
    """A user's post with padding, overlapping windows or ceil mode is not written out: ``post_lin`` goes through
    torch.func.vjp and its activity and pullback equal float64 autograd of the post's modules (torch.autograd, not
    functorch). Fails if such a post were taken for a written-out one (its windows would be wrong)."""
    gen = torch.Generator().manual_seed(15)

    y = pool(torch.zeros(1, 2, SIDE, SIDE))

    def make_model(width):  # the readout's fan-in from the pooled map
        return nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.GELU(), pool, nn.Flatten(),
                             nn.Linear(width * y.shape[2] * y.shape[3], 3))
    net = _module_net(make_model, (2, SIDE, SIDE), F64)
    assert net._pooled(1) is None and net._needs_vjp(1)
    calls = []
    real = posts.post_vjp
    with monkeypatch.context() as m:
        m.setattr(posts, "post_vjp", lambda *a: calls.append(1) or real(*a))
        u = _ties((2, 3, *net._u_shapes[1]), F64, gen)
        a, back = net.post_lin(1, u)
    assert not calls
    w = u.clone().requires_grad_(True)
    ref_a = nn.Sequential(nn.GELU(), pool, nn.Flatten())(w.reshape(6, *u.shape[2:])).reshape(2, 3, -1)
    g = torch.randn(ref_a.shape, generator=gen, dtype=F64)
    (ref,) = torch.autograd.grad(ref_a, w, g)
    assert torch.allclose(a, ref_a.detach(), rtol=1e-13, atol=0)
    assert torch.allclose(back(g), ref, rtol=1e-12, atol=1e-14)


def test_fast_off_and_other_dtypes_take_the_plain_path(monkeypatch):
    """``posts.FAST = False`` (the benchmark's and these tests' reference) and a dtype other than float32 / float64
    never reach the written-out post: the switch really switches."""
    net = CNN((1, 8, 8), 4, 3, 3, preset("sp", "sgd"), "relu", K=1, seeds=[0])
    u = torch.randn(1, 2, 4, 8, 8)
    fail = lambda *a: pytest.fail("written-out post taken")  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(posts, "post_vjp", fail)
        m.setattr(posts, "post", fail)
        m.setattr(posts, "FAST", False)
        net.post_lin(1, u)
        net.post(1, u)
    assert not posts.applies(net._pooled(1), u.to(torch.bfloat16))
    assert posts.applies(net._pooled(1), u) and not posts.applies(None, u)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_cuda_vgg5_posts_are_bitwise_the_vjp(act, monkeypatch):
    """On a GPU the written-out posts run the contiguous kernels autograd runs: bitwise torch.func.vjp's there too
    (benchmarks/gpu_check.sh runs this)."""
    gen = torch.Generator().manual_seed(13)
    net = ModuleNet(zoo.factory("vgg5", (1, 28, 28), act), (1, 28, 28), 16, preset("mup", "adam", base_width=2), K=2,
                    seeds=[0, 1], device="cuda")
    for l in range(1, net.depth):
        u = _ties((2, 3, *net._u_shapes[l]), F32, gen).to("cuda")
        a_ref, back_ref = _plain(net, l, u)
        a, back = net.post_lin(l, u)
        g = torch.randn(a_ref.shape, generator=gen).to("cuda")
        assert torch.equal(a, a_ref) and torch.equal(back(g), back_ref(g)), l


def test_a_pooled_post_names_its_activation_and_pooling():
    """An activation or pooling the written-out post does not compute is refused, not computed as another."""
    with pytest.raises(ConfigError, match="unknown activation of a pooled post 'sigmoid'"):
        posts.native("sigmoid", "max")
    with pytest.raises(ConfigError, match="unknown pooling 'lp'"):
        posts.Pooled("relu", "lp", (2, 2))
