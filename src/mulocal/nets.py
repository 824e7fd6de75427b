"""Networks whose every weight carries a leading replica dimension K.

K replicas are K independent models (own seed, own learning rate) computed in one batched
call: dense layers use ``bmm`` over (K, B, features), conv layers a grouped convolution.
Activations are laid out (K, B, ...) everywhere.

Notation (as in the paper): value / pre-activation of layer l is ``u_l``; the activity the
next layer reads is ``a_l = post_l(u_l)`` (phi, and for the CNN pooling / flattening);
``a_0`` is the input (no activation on the input). Layer l computes

    u_l = mult_l * W_l a_{l-1} + b_l,      f = u_L.

A residual net (``ResMLP``) adds the value below to some layers (``Net.residual(l)``):
u_l = u_{l-1} + a_l (W_l a_{l-1} + b_l) (``Net.predict``); ``a_l`` there is the branch multiplier
of ``Parameterization.rule`` (folded into the layer's ``mult`` and applied to its bias).

Each layer (``layers.py``) exposes the three local operations every learning rule needs, without autograd:
``forward`` (W a), ``backward_input`` (W^T delta) and ``grads`` (delta a^T averaged over the
batch).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from . import posts
from .errors import CheckpointError, ConfigError, choice_error
from .layers import Branch, Conv, ConvBranch, Dense
from .param import Parameterization, check_width, layer_roles
from .streams import generator

ACTIVATIONS = ("tanh", "relu", "linear")
KERNEL = 3  # the CNN's default kernel size


def act_fn(name: str):
    """(phi, phi') for an activation name."""
    if name == "tanh":
        return torch.tanh, lambda u: 1 - torch.tanh(u) ** 2
    if name == "relu":
        return torch.relu, lambda u: (u > 0).to(u.dtype)
    if name == "linear":
        return (lambda u: u), (lambda u: torch.ones_like(u))
    raise choice_error("activation", name, ACTIVATIONS)


class Net:
    """Base class: a stack of layers with per-replica initialisation and local operations."""

    kind = "net"

    def __init__(self, param: Parameterization, width: int, K: int, activation: str, bias: bool, dtype, device):
        if not isinstance(param, Parameterization):
            raise ConfigError(f"param must be a Parameterization, got {type(param).__name__}")
        self.param, self.width = param, check_width(width)
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ConfigError(f"number of replicas K must be a positive integer, got {K!r}")
        self.K, self.activation, self.use_bias = K, activation, bool(bias)
        self.phi, self.dphi = act_fn(activation)
        self.dtype, self.device = dtype, torch.device(device)
        self.layers: list = []

    # ---------------------------------------------------------------- structure
    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def rule_depth(self) -> int:
        """The depth H the depth rules read (d = (H - 2) / (H_0 - 2) residual blocks relative to the base net's): the
        number of weight layers of a native net (its hidden layers are its residual blocks)."""
        return self.depth

    def params(self) -> list[torch.Tensor]:
        """All trainable tensors, layer by layer: W_1, b_1, W_2, ..."""
        return [t for layer in self.layers for t in layer.tensors()]

    def param_info(self) -> list[tuple[int, str]]:
        """(layer index, "weight" | "bias") of each entry of :meth:`params`."""
        return [(i, kind) for i, layer in enumerate(self.layers) for kind in layer.kinds()]

    def init(self, seeds: Sequence[int]) -> "Net":
        """Draw every replica's weights from its own generator (seed k -> replica k).

        Weights are drawn on the CPU in float64 then cast, so a replica's weights do not depend
        on K, dtype of the batch, or device.
        """
        seeds = [int(s) for s in seeds]
        if len(seeds) != self.K:
            raise ConfigError(f"need one seed per replica: got {len(seeds)} seeds for K = {self.K}")
        self.seeds = seeds  # learning rules with their own random state (TP feedback) derive it from these
        for k, seed in enumerate(seeds):
            gen = generator("init", seed)
            for layer in self.layers:
                layer.draw(k, gen)
        return self

    def config(self) -> dict:
        raise NotImplementedError

    # ---------------------------------------------------------------- computation
    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Accept (B, ...) shared by all replicas or (K, B, ...) per replica."""
        x = torch.as_tensor(x)
        shape, n = tuple(self.input_shape), len(self.input_shape)
        if x.dim() == n + 1 and tuple(x.shape[1:]) == shape:
            x = x.unsqueeze(0).expand(self.K, *x.shape)
        elif not (x.dim() == n + 2 and x.shape[0] == self.K and tuple(x.shape[2:]) == shape):
            raise ConfigError(f"input of shape {tuple(x.shape)} does not fit this {self.kind} (input shape {shape}, "
                              f"K = {self.K}): expected (B, {', '.join(map(str, shape))}) or (K, B, ...)")
        return self.post(0, x.to(self.device, self.dtype))

    def post(self, l: int, u: torch.Tensor) -> torch.Tensor:
        """Activity a_l fed to layer l+1 from the value u_l (l = 0 is the input)."""
        raise NotImplementedError

    def _needs_vjp(self, l: int) -> bool:
        """Whether post_l is more than one elementwise activation (a pooled post), so that its linearization is a
        vjp through it rather than phi'(u_l) * g."""
        return False

    def linearize(self, l: int, u: torch.Tensor, a: torch.Tensor | None = None):
        """The map g -> (d a_l / d u_l)^T g at u (``a = post(l, u)`` may be passed to save work): phi'(u) * g, or
        the vjp through the post where ``_needs_vjp(l)``.

        Build it once and reuse it while u is fixed (FPA, or several uses in one sweep).
        """
        return self._post_vjp(l, u)[1] if self._needs_vjp(l) else self._dphi(u, a).mul

    def post_lin(self, l: int, u: torch.Tensor):
        """(a_l = post(l, u), linearize(l, u, a_l)): where the map needs the post's own evaluation (a pooled post,
        built by a vjp), both come from one (``_post_vjp``); the same numbers as the two calls."""
        if self._needs_vjp(l):
            return self._post_vjp(l, u)
        a = self.post(l, u)
        return a, self.linearize(l, u, a)

    _pools: Sequence = ()  # per layer l: the pooled post (posts.Pooled) that post_l is, or None; built once

    def _pooled(self, l: int) -> posts.Pooled | None:
        """The pooled post (``posts.Pooled``: act, then k x k pooling) that post_l is, or None (another post)."""
        return self._pools[l] if l < len(self._pools) else None

    def _post_vjp(self, l: int, u: torch.Tensor):
        """(post(l, u), g -> (d a_l / d u_l)^T g) from one evaluation of the post: a pooled post written out
        (``posts.post_vjp``, bitwise the same numbers), any other by ``torch.func.vjp``, which returns its primal
        output with the pullback."""
        spec = self._pooled(l)
        if posts.applies(spec, u):
            return posts.post_vjp(spec, u)
        a, vjp = torch.func.vjp(lambda w: self.post(l, w), u)
        return a, lambda g: vjp(g)[0]

    def _pool(self, a):
        """2 x 2 pooling (``self.pool``: max or avg) of (K, B, C, H, W) images, per replica and sample."""
        K, B = a.shape[:2]
        flat = a.reshape(K * B, *a.shape[2:])
        y = F.max_pool2d(flat, 2) if self.pool == "max" else F.avg_pool2d(flat, 2)
        return y.reshape(K, B, *y.shape[1:])

    def _dphi(self, u: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """phi'(u), from a = phi(u) when given (tanh: 1 - a^2, no second tanh)."""
        return (1 - a * a) if (a is not None and self.activation == "tanh") else self.dphi(u)

    def residual(self, l: int) -> bool:
        """Whether layer l (1-based) adds the value below: u_l = u_{l-1} + layer_l(a_{l-1}). Plain nets: never."""
        return False

    @property
    def residual_net(self) -> bool:
        """Whether any layer is residual (a residual net: its hidden values u_l form the residual stream)."""
        return any(self.residual(l) for l in range(1, self.depth + 1))

    def predict(self, l: int, a_prev: torch.Tensor, u_prev: torch.Tensor) -> torch.Tensor:
        """u_l from the activity a_{l-1} (and, for a residual layer, the value u_{l-1} below)."""
        u = self.layers[l - 1].forward(a_prev)
        return u + u_prev if self.residual(l) else u

    def forward(self, x: torch.Tensor, lin_from: int | None = None):
        """Feed-forward pass: ``us`` (u_1..u_L, with us[0] = a_0) and ``acts`` (a_0..a_{L-1}); with ``lin_from``,
        also ``jacs``: jacs[l] = linearize(l, u_l) for lin_from <= l < L (None elsewhere), each built with its
        activity (``post_lin``)."""
        a = self.prepare_input(x)
        us, acts, jacs = [a], [a], [None] * self.depth
        for l in range(1, len(self.layers) + 1):
            u = self.predict(l, a, us[l - 1])
            us.append(u)
            if l < self.depth:
                if lin_from is not None and l >= lin_from:
                    a, jacs[l] = self.post_lin(l, u)
                else:
                    a = self.post(l, u)
                acts.append(a)
        return (us, acts) if lin_from is None else (us, acts, jacs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Output f of shape (K, B, C)."""
        return self.forward(x)[0][-1]

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> list[torch.Tensor]:
        return [p.detach().cpu().clone() for p in self.params()]

    def load_state(self, tensors: Sequence[torch.Tensor]) -> None:
        mine = self.params()
        if len(tensors) != len(mine):
            raise CheckpointError(f"checkpoint has {len(tensors)} tensors, this {self.kind} has {len(mine)}")
        for i, (p, t) in enumerate(zip(mine, tensors)):
            if tuple(p.shape) != tuple(t.shape):
                layer, what = self.param_info()[i]
                raise CheckpointError(f"checkpoint {what} of layer {layer + 1} has shape {tuple(t.shape)}, "
                                      f"this {self.kind} needs {tuple(p.shape)}")
        for p, t in zip(mine, tensors):
            p.copy_(t)


class MLP(Net):
    """``depth`` weight layers: in_dim -> width -> ... -> width -> out_dim."""

    kind = "mlp"

    def __init__(self, in_dim: int | Sequence[int], width: int, out_dim: int, depth: int = 3,
                 param: Parameterization | None = None,
                 activation: str = "tanh", bias: bool = True, K: int = 1, seeds: Sequence[int] | None = None,
                 dtype=torch.float32, device="cpu"):
        super().__init__(param or Parameterization(name="sp"), width, K, activation, bias, dtype, device)
        self.input_shape = (int(in_dim),) if isinstance(in_dim, int) else tuple(int(d) for d in in_dim)
        self.in_dim, self.out_dim = math.prod(self.input_shape), int(out_dim)
        dims = [self.in_dim] + [self.width] * (depth - 1) + [self.out_dim]
        for i, role in enumerate(layer_roles(depth)):
            self.layers.append(self._layer(role, dims[i], dims[i + 1], depth, bias, dtype))
        self.init(seeds if seeds is not None else range(K))

    def _layer(self, role, fan_in, fan_out, depth, bias, dtype):
        rule = self.param.rule(role, fan_in, self.width)
        return Dense(role, fan_in, fan_out, self.K, bias, rule, dtype, self.device)

    def post(self, l, u):
        if l == 0:
            return u.reshape(*u.shape[:2], -1)
        return self.phi(u)

    def config(self) -> dict:
        return dict(kind=self.kind, in_shape=list(self.input_shape), width=self.width, out_dim=self.out_dim, depth=self.depth,
                    activation=self.activation, bias=self.use_bias, K=self.K)


class _Residual:
    """Residual nets: every layer but the input and output layers is a block (u_l = u_{l-1} + branch)."""

    def residual(self, l: int) -> bool:
        return 1 < l < len(self.layers)

    @property
    def residual_net(self) -> bool:
        return len(self.layers) > 2


class ResMLP(_Residual, MLP):
    """Residual MLP of ``depth`` = H weight layers: an input layer (in_dim -> M), H - 2 residual blocks and an
    output layer (M -> out_dim):

        h_1 = W_1 x + b_1,   h_l = h_{l-1} + a_l (W_l phi(h_{l-1}) + b_l)  (l = 2..H-1),   f = W_H phi(h_{H-1}) + b_H

    (each W with its width multiplier), a_l = ((H - 2) / (H_0 - 2))^-alpha from ``Parameterization.rule(...,
    residual=True)``. ``us`` are the h_l (the residual stream), ``acts`` phi(h_l), as in the MLP. Backprop
    (``algos/bp.py``) adds the identity path: delta_{l-1} = delta_l + phi'(h_{l-1}) * (a_l mult_l W_l^T delta_l).
    Weights are drawn like the MLP's (same seeds, same stream): a ResMLP and an MLP of one depth share them.
    """

    kind = "resmlp"

    def __init__(self, in_dim: int | Sequence[int], width: int, out_dim: int, depth: int = 4, *args, **kw):
        super().__init__(in_dim, width, out_dim, depth, *args, **kw)

    def _layer(self, role, fan_in, fan_out, depth, bias, dtype):
        if role != "hidden":  # input and output layers: as in the MLP
            return super()._layer(role, fan_in, fan_out, depth, bias, dtype)
        rule = self.param.rule(role, fan_in, self.width, depth=depth, residual=True)
        return Branch(role, fan_in, fan_out, self.K, bias, rule, dtype, self.device)

class CNN(Net):
    """conv(k) -> phi -> pool2 -> [conv(k) -> phi -> pool2] * (depth - 2) -> flatten -> linear readout.

    The channel count is the scaled width; the first conv is the input layer, the readout the
    output layer (fan-in width * spatial size).
    """

    kind = "cnn"

    def __init__(self, in_shape: Sequence[int], width: int, out_dim: int, depth: int = 3,
                 param: Parameterization | None = None, activation: str = "tanh", bias: bool = True, K: int = 1,
                 seeds: Sequence[int] | None = None, kernel: int = KERNEL, pool: str = "max", dtype=torch.float32,
                 device="cpu"):
        super().__init__(param or Parameterization(name="sp"), width, K, activation, bias, dtype, device)
        if len(in_shape) != 3:
            raise ConfigError(f"CNN needs image inputs (C, H, W), got shape {tuple(in_shape)}")
        if pool not in ("max", "avg"):
            raise ConfigError(f"unknown pooling '{pool}'; choose max or avg")
        self.input_shape = tuple(int(s) for s in in_shape)
        self.out_dim, self.kernel, self.pool = int(out_dim), int(kernel), pool
        convs, (c, h, w) = cnn_plan(self.input_shape, self.width, depth)
        for role, c_in, _ in convs:
            rule = self.param.rule(role, c_in * kernel * kernel, self.width)
            self.layers.append(Conv(role, c_in, self.width, kernel, K, bias, rule, dtype, self.device))
        self.spatial = (h, w)
        rule = self.param.rule("output", c * h * w, self.width)
        self.layers.append(Dense("output", c * h * w, self.out_dim, K, bias, rule, dtype, self.device))
        self._pools = [None] + [posts.native(self.activation, self.pool, l == self.depth - 1)
                                for l in range(1, self.depth)]
        self.init(seeds if seeds is not None else range(K))

    def post(self, l, u):
        if l == 0:
            return u
        if posts.applies(spec := self._pooled(l), u):
            return posts.post(spec, u)
        a = self._pool(self.phi(u))
        return a.flatten(2) if l == self.depth - 1 else a

    def _needs_vjp(self, l):
        return True  # every post pools

    def config(self) -> dict:
        return dict(kind=self.kind, in_shape=list(self.input_shape), width=self.width, out_dim=self.out_dim,
                    depth=self.depth, activation=self.activation, bias=self.use_bias, K=self.K, kernel=self.kernel,
                    pool=self.pool)


class ResCNN(_Residual, Net):
    """Residual CNN of ``depth`` = H weight layers (channels = the scaled width M):

        h_1 = conv_1(pool_in(x)) + b_1,   h_l = h_{l-1} + a_l (conv_l(phi(h_{l-1})) + b_l)  (l = 2..H-1),
        f   = W_H flatten(pool2(phi(h_{H-1}))) + b_H

    pool_in is a fixed ``in_pool`` x ``in_pool`` average pooling of the image (28 x 28 -> 14 x 14 by default, to
    keep the blocks cheap), the blocks are same-padded k x k convolutions M -> M (the stream keeps its shape
    (M, h, w)), pool2 the readout's 2 x 2 pooling (``pool``: max or avg), as in the CNN. Depth factors as in
    ``ResMLP`` (``ConvBranch``: a_l folded into the conv's multiplier and applied to its bias). ``us`` are the
    h_l, ``acts`` phi(h_l) (the last one pooled and flattened).
    """

    kind = "rescnn"

    def __init__(self, in_shape: Sequence[int], width: int, out_dim: int, depth: int = 4,
                 param: Parameterization | None = None, activation: str = "tanh", bias: bool = True, K: int = 1,
                 seeds: Sequence[int] | None = None, kernel: int = KERNEL, pool: str = "max", in_pool: int = 2,
                 dtype=torch.float32, device="cpu"):
        super().__init__(param or Parameterization(name="sp"), width, K, activation, bias, dtype, device)
        if len(in_shape) != 3:
            raise ConfigError(f"a residual CNN needs image inputs (C, H, W), got shape {tuple(in_shape)}")
        if pool not in ("max", "avg"):
            raise ConfigError(f"unknown pooling '{pool}'; choose max or avg")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 3:
            raise ConfigError(f"a residual CNN needs depth (number of weight layers) >= 3, got {depth!r}")
        self.input_shape = tuple(int(s) for s in in_shape)
        self.out_dim, self.kernel, self.pool, self.in_pool = int(out_dim), int(kernel), pool, int(in_pool)
        c, h, w = self.input_shape
        hs, ws = h // self.in_pool, w // self.in_pool
        if hs < 2 or ws < 2:
            raise ConfigError(f"in_pool {in_pool} leaves a {hs} x {ws} image of {tuple(in_shape)}: too small to pool")
        self.stream_shape = (self.width, hs, ws)
        k = self.kernel
        self.layers.append(Conv("input", c, self.width, k, K, bias, self.param.rule("input", c * k * k, self.width),
                                dtype, self.device))
        rule = self.param.rule("hidden", self.width * k * k, self.width, depth=depth, residual=True)
        for _ in range(depth - 2):
            self.layers.append(ConvBranch("hidden", self.width, self.width, k, K, bias, rule, dtype, self.device))
        self.spatial = (hs // 2, ws // 2)
        fan = self.width * (hs // 2) * (ws // 2)
        self.layers.append(Dense("output", fan, self.out_dim, K, bias, self.param.rule("output", fan, self.width),
                                 dtype, self.device))
        self._pools = [posts.native(self.activation, self.pool, True) if l == self.depth - 1 else None
                       for l in range(self.depth)]
        self.init(seeds if seeds is not None else range(K))

    def post(self, l, u):
        if l == 0:
            if self.in_pool == 1:
                return u
            K, B = u.shape[:2]
            y = F.avg_pool2d(u.reshape(K * B, *u.shape[2:]), self.in_pool)
            return y.reshape(K, B, *y.shape[1:])
        if posts.applies(spec := self._pooled(l), u):
            return posts.post(spec, u)
        a = self.phi(u)
        return a if l < self.depth - 1 else self._pool(a).flatten(2)

    def _needs_vjp(self, l):
        return l == self.depth - 1  # the readout's input is pooled

    def config(self) -> dict:
        return dict(kind=self.kind, in_shape=list(self.input_shape), width=self.width, out_dim=self.out_dim,
                    depth=self.depth, activation=self.activation, bias=self.use_bias, K=self.K, kernel=self.kernel,
                    pool=self.pool, in_pool=self.in_pool)


NATIVE_ARCHS = ("mlp", "cnn", "resmlp", "rescnn")  # what ``build`` builds
ARCHS = NATIVE_ARCHS + ("vgg5", "vgg7")  # vgg5 / vgg7: zoo.py nets, built through the adapter
RESIDUAL_ARCHS = ("resmlp", "rescnn")  # nets with residual blocks (``Net.residual_net`` from depth 3)


def cnn_plan(in_shape: Sequence[int], width: int, depth: int):
    """The CNN's conv layers as (role, input channels, input spatial size), and the readout's input (C, h, w)."""
    c, h, w = (int(s) for s in in_shape)
    convs = []
    for role in layer_roles(depth)[:-1]:
        convs.append((role, c, (h, w)))
        c, h, w = width, h // 2, w // 2
        if h == 0 or w == 0:
            raise ConfigError(f"CNN of depth {depth} pools a {tuple(in_shape)} image to nothing; use less depth")
    return convs, (c, h, w)


def sizes(arch: str, input_shape: Sequence[int], out_dim: int, width: int, depth: int, kernel: int = KERNEL,
          bias: bool = True) -> tuple[int, int]:
    """(parameters, activations per sample) of one replica, without building it (memory planning)."""
    if arch in ("vgg5", "vgg7"):  # zoo.py's nets: their own plan (depth, kernel do not apply)
        from .zoo import sizes as zoo_sizes
        return zoo_sizes(arch, input_shape, out_dim, width, bias)
    if arch == "cnn":
        convs, (c, h, w) = cnn_plan(input_shape, width, depth)
        params = sum(c_in * kernel * kernel * width + width * bias for _, c_in, _ in convs)
        acts = sum(width * hw[0] * hw[1] for _, _, hw in convs) + out_dim
        return params + c * h * w * out_dim + out_dim * bias, acts
    if arch == "rescnn":
        c, h, w = (int(s) for s in input_shape)
        hs, ws = h // 2, w // 2  # the default in_pool
        params = c * kernel * kernel * width + (depth - 2) * width * width * kernel * kernel + width * (depth - 1) * bias
        fan = width * (hs // 2) * (ws // 2)
        return params + fan * out_dim + out_dim * bias, (depth - 1) * width * hs * ws + out_dim
    dims = [math.prod(input_shape)] + [width] * (depth - 1) + [out_dim]
    return sum(a * b + b * bias for a, b in zip(dims[:-1], dims[1:])), sum(dims[1:])


def build(arch: str, input_shape: Sequence[int], out_dim: int, width: int, param: Parameterization, *,
          depth: int = 3, activation: str = "tanh", bias: bool = True, K: int = 1,
          seeds: Sequence[int] | None = None, dtype=torch.float32, device="cpu") -> Net:
    """Build an MLP (inputs are flattened), a residual MLP (``resmlp``, depth-muP), a CNN or a residual CNN
    (``rescnn``) for a dataset's input shape."""
    if arch == "resmlp":
        return ResMLP(tuple(input_shape), width, out_dim, depth, param, activation, bias, K, seeds, dtype, device)
    if arch == "mlp":
        return MLP(tuple(input_shape), width, out_dim, depth, param, activation, bias, K, seeds, dtype, device)
    if arch == "rescnn":
        return ResCNN(input_shape, width, out_dim, depth, param, activation, bias, K, seeds, dtype=dtype, device=device)
    if arch == "cnn":
        return CNN(input_shape, width, out_dim, depth, param, activation, bias, K, seeds, dtype=dtype, device=device)
    if arch in ARCHS:
        raise ConfigError(f"architecture '{arch}' is a zoo net: build it with zoo.factory and adapter.ModuleNet "
                          f"(as config.Run.build_net does)")
    raise choice_error("architecture", arch, NATIVE_ARCHS)
