"""Pooled posts and their pullbacks, written out: bitwise what ``torch.func.vjp`` of the plain post gives, faster.

A pooled post (PCX's conv block after its conv, the native CNN's post) maps a layer's value u of shape
(K, B, C, H, W) to the activity the next layer reads:

    z = act(u),   a = pool(z)   [flattened to (K, B, C h w)],   pool: kh x kw max or average, stride (kh, kw),

and its pullback (the linearization every learning rule applies, ``Net.linearize``) is

    g -> (da/du)^T g = act'(u) * pool^T(g):   max: g put at each window's argmax (its first maximum in row-major
                                              order; its last NaN if any), 0 elsewhere;
                                              avg: g / (kh kw, or AvgPool2d's divisor) at every entry of the window.

``post_vjp`` computes both with the aten kernels autograd runs for them (``max_pool2d_with_indices`` and its
backward with the saved indices, ``avg_pool2d_backward``, ``gelu_backward`` at u with GELU's ``approximate``,
``threshold_backward`` / ``tanh_backward`` at z = act(u), ``hardtanh_backward`` at u), on the same tensors in the
same layouts, so the activity and every pullback are bitwise those of ``torch.func.vjp`` through the post's modules
(tests/test_pooled_post.py); what changes is the pooling's forward: on a CPU it runs channels-last (``max_pool2d``
on a 128 x 32 x 28 x 28 map: 1.4 ms against 16 ms contiguous, one thread; 4.8 ms with the layout copies), which
gives the same values and the same indices, ties and NaNs included (both kernels keep a window's first maximum,
or its last NaN); elsewhere (a GPU) the contiguous kernels run, as autograd's, without functorch's overhead. ``post``
is the activity alone, the same way. The outputs are laid out as the plain post's (contiguous for a contiguous u).

``FAST = False`` turns it off: ``Net`` then takes the plain post and ``torch.func.vjp`` (the reference of the tests
and of ``benchmarks/bench_conv.py --compare-posts``). A post of another form (padding, stride != kernel, dilation,
ceil mode, another activation or order, an in-place activation) or another dtype than float32 / float64 always takes
the plain path.

To add an activation: its forward in ``_act``, the backward autograd runs for it (derivatives.yaml) in
``_act_backward``, its module in ``_module_act``, and a case in tests/test_pooled_post.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import check_choice

FAST = True  # False: every post through the plain path (the post's modules and torch.func.vjp)
DTYPES = (torch.float32, torch.float64)  # avg pooling's channels-last sums are those of the contiguous kernel here
ACTS = ("linear", "relu", "tanh", "gelu", "hardtanh")


@dataclass(frozen=True)
class Pooled:
    """A post a = [flatten](pool_k(act(u))): ``act`` one of ACTS (``approximate``: GELU's; ``bounds``: Hardtanh's),
    ``pool`` "max" or "avg" with kernel = stride = ``kernel``, no padding, dilation 1, floor mode; ``flatten``:
    the pooled (C, h, w) flattened (an ``nn.Flatten()`` after the pooling, or the native nets' last post);
    ``count_include_pad`` / ``divisor``: AvgPool2d's (``divisor_override``)."""

    act: str
    pool: str
    kernel: tuple[int, int]
    flatten: bool = False
    approximate: str = "none"
    bounds: tuple[float, float] = (-1.0, 1.0)
    count_include_pad: bool = True
    divisor: int | None = None

    def __post_init__(self):
        check_choice("activation of a pooled post", self.act, ACTS)
        check_choice("pooling", self.pool, ("max", "avg"))


def native(activation: str, pool: str, flatten: bool = False) -> Pooled:
    """The native nets' post ``_pool(phi(u))`` (``nets.CNN``, ``nets.ResCNN``): phi = activation (tanh, relu,
    linear), 2 x 2 max or avg pooling as ``F.max_pool2d(z, 2)`` / ``F.avg_pool2d(z, 2)``."""
    return Pooled(activation, pool, (2, 2), flatten)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)


def _module_act(m: nn.Module) -> dict | None:
    """The activation fields of ``Pooled`` for an elementwise activation module, None for any other module."""
    if getattr(m, "inplace", False):
        return None  # an in-place activation writes into u: the plain path keeps that behaviour
    if type(m) is nn.Identity:
        return dict(act="linear")
    if type(m) is nn.ReLU:
        return dict(act="relu")
    if type(m) is nn.Tanh:
        return dict(act="tanh")
    if type(m) is nn.GELU:
        return dict(act="gelu", approximate=m.approximate)
    if type(m) is nn.Hardtanh:
        return dict(act="hardtanh", bounds=(float(m.min_val), float(m.max_val)))
    return None


def _module_pool(m: nn.Module) -> dict | None:
    """The pooling fields of ``Pooled`` for a MaxPool2d / AvgPool2d with kernel = stride, no padding, dilation 1,
    floor mode (and no indices returned); None otherwise."""
    if type(m) is nn.MaxPool2d:
        if m.return_indices or _pair(m.dilation) != (1, 1):
            return None
        out = dict(pool="max")
    elif type(m) is nn.AvgPool2d:
        out = dict(pool="avg", count_include_pad=bool(m.count_include_pad), divisor=m.divisor_override)
    else:
        return None
    k = _pair(m.kernel_size)
    stride = _pair(m.stride if m.stride is not None else m.kernel_size)
    if stride != k or _pair(m.padding) != (0, 0) or m.ceil_mode:
        return None
    return dict(out, kernel=k)


def from_modules(mods) -> Pooled | None:
    """The ``Pooled`` that the modules ``[act,] pool [, Flatten()]`` compute (the adapter's post of a unit), or
    None when they are not of that form (the post then takes the plain path)."""
    mods = list(mods)
    fields: dict = dict(act="linear")
    if mods and _module_act(mods[0]) is not None:
        fields.update(_module_act(mods.pop(0)))
    if not mods or _module_pool(mods[0]) is None:
        return None
    fields.update(_module_pool(mods.pop(0)))
    if mods and type(mods[0]) is nn.Flatten and (mods[0].start_dim, mods[0].end_dim) == (1, -1):
        mods.pop(0)
        fields["flatten"] = True
    return Pooled(**fields) if not mods else None


def applies(spec: Pooled | None, u: torch.Tensor) -> bool:
    """Whether ``post`` / ``post_vjp`` compute the post ``spec`` at u: FAST, a pooled post, u of shape
    (K, B, C, H, W) in float32 or float64."""
    return FAST and spec is not None and u.dim() == 5 and u.dtype in DTYPES


# ------------------------------------------------------------------------------------------- the pieces
def _act(spec: Pooled, y: torch.Tensor) -> torch.Tensor:
    """z = act(y): the call the plain post makes (the module's or the native net's phi)."""
    if spec.act == "linear":
        return y
    if spec.act == "relu":
        return torch.relu(y)
    if spec.act == "tanh":
        return torch.tanh(y)
    if spec.act == "gelu":
        return F.gelu(y, approximate=spec.approximate)
    return F.hardtanh(y, *spec.bounds)


def _act_backward(spec: Pooled, g: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """act'(y) * g as autograd computes it (derivatives.yaml): relu and tanh from their result z, GELU and
    Hardtanh from their input y."""
    if spec.act == "linear":
        return g
    if spec.act == "relu":
        return torch.ops.aten.threshold_backward(g, z, 0)
    if spec.act == "tanh":
        return torch.ops.aten.tanh_backward(g, z)
    if spec.act == "gelu":
        return torch.ops.aten.gelu_backward(g, y, approximate=spec.approximate)
    return torch.ops.aten.hardtanh_backward(g, y, *spec.bounds)


def _channels_last(z: torch.Tensor) -> bool:
    """Whether to pool z through a channels-last copy: on a CPU, where its kernels vectorize over channels and the
    contiguous ones do not (the copy costs less than the difference on VGG-5's maps from width 4 on; at 2 channels
    it costs more: 1.35 against 0.93 ms on 128 x 2 x 28 x 28)."""
    return z.device.type == "cpu" and (z.is_contiguous() or not z.is_contiguous(memory_format=torch.channels_last))


def _max_pool(z: torch.Tensor, k: tuple[int, int], indices: bool = True):
    """(values, indices or None) of ``max_pool2d_with_indices(z, k, k)``, laid out as that call on z lays them out
    (``indices=False``: the values alone)."""
    if not _channels_last(z):
        y, idx = torch.ops.aten.max_pool2d_with_indices(z, list(k), list(k))
        return y, idx if indices else None
    y, idx = torch.ops.aten.max_pool2d_with_indices(z.contiguous(memory_format=torch.channels_last), list(k), list(k))
    return y.contiguous(), idx.contiguous() if indices else None


def _avg_pool(spec: Pooled, z: torch.Tensor) -> torch.Tensor:
    """``avg_pool2d(z, k, k)`` with the module's count_include_pad / divisor, laid out as that call lays it out."""
    k = list(spec.kernel)
    if not _channels_last(z):
        return torch.ops.aten.avg_pool2d(z, k, k, [0, 0], False, spec.count_include_pad, spec.divisor)
    zc = z.contiguous(memory_format=torch.channels_last)
    return torch.ops.aten.avg_pool2d(zc, k, k, [0, 0], False, spec.count_include_pad, spec.divisor).contiguous()


def _flat(u: torch.Tensor) -> torch.Tensor:
    return u.reshape(u.shape[0] * u.shape[1], *u.shape[2:])


def _unflat(spec: Pooled, p: torch.Tensor, K: int, B: int) -> torch.Tensor:
    a = p.reshape(K, B, *p.shape[1:])
    return a.flatten(2) if spec.flatten else a


# ------------------------------------------------------------------------------------------- the post
def post(spec: Pooled, u: torch.Tensor) -> torch.Tensor:
    """a = [flatten](pool(act(u))) for u of shape (K, B, C, H, W): the plain post's values (pooling channels-last
    on a CPU)."""
    K, B = u.shape[:2]
    z = _act(spec, _flat(u))
    p = _max_pool(z, spec.kernel, indices=False)[0] if spec.pool == "max" else _avg_pool(spec, z)
    return _unflat(spec, p, K, B)


def post_vjp(spec: Pooled, u: torch.Tensor):
    """(a = post(spec, u), g -> (da/du)^T g): the pullback from the saved z = act(u) (and the max pooling's
    indices): pool^T by ``max_pool2d_with_indices_backward`` / ``avg_pool2d_backward`` on z's layout, then act'
    by the backward autograd runs; g of a's shape, the result of u's. Bitwise what ``torch.func.vjp`` of the
    plain post returns."""
    K, B = u.shape[:2]
    y = _flat(u)
    z = _act(spec, y)
    k = list(spec.kernel)
    if spec.pool == "max":
        p, idx = _max_pool(z, spec.kernel)

        def pool_t(g):
            return torch.ops.aten.max_pool2d_with_indices_backward(g, z, k, k, [0, 0], [1, 1], False, idx)
    else:
        p = _avg_pool(spec, z)

        def pool_t(g):
            return torch.ops.aten.avg_pool2d_backward(g, z, k, k, [0, 0], False, spec.count_include_pad,
                                                      spec.divisor)
    shape = p.shape

    def pullback(g: torch.Tensor) -> torch.Tensor:
        return _act_backward(spec, pool_t(g.reshape(shape)), y, z).reshape(u.shape)

    return _unflat(spec, p, K, B), pullback
