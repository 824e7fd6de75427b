"""``ModuleNet``: a user's model as a mulocal net (the ``nets.Net`` interface every learning rule reads).

Unit l of the model (``read.py``) is layer l: its output is the node u_l, a_l = post_l(u_l) is what unit l + 1
reads (post_l: the parameter-free modules after unit l, then the branch prefix of unit l + 1 when that is a
residual block with a known branch), and

    u_l = layer_l(a_{l-1})              (a plain unit)
    u_l = u_{l-1} + layer_l(a_{l-1})    (a residual unit: layer_l is its branch times d^-alpha)

exactly the native nets' structure (``nets.Net.predict``). Each layer's rule is ``Parameterization.rule(role,
fan_in, width, depth, residual)`` with the role and fan-in ``read.py`` found; residual units count d = (number of
residual units) / (H_0 - 2). Weights are drawn like the native nets': replica k from the ``init`` stream of its
seed, layer by layer, each matrix ~ N(0, init_std^2) in float64 then cast; biases start at zero, other
vector-like tensors (norm gains) at the module's own values.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import posts
from ..errors import ConfigError
from ..layers import Branch, Dense
from ..nets import Net
from ..param import Parameterization, check_width
from .layers import AffineConv, AffineConvBranch, ModuleLayer
from .read import read

ELEMENTWISE = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Identity: "linear"}


class ModuleNet(Net):
    """A model built by ``make(width)`` (an ``nn.Sequential`` of units) with K replicas, under ``param``."""

    kind = "model"

    def __init__(self, make, input_shape: Sequence[int], width: int, param: Parameterization | None = None,
                 K: int = 1, seeds: Sequence[int] | None = None, dtype=torch.float32, device="cpu",
                 depth: int | None = None, spec: str | None = None):
        prefix, units, out_shape = read(make, check_width(width), tuple(int(s) for s in input_shape),
                                        (param or Parameterization(name="sp")).base_width, depth)
        acts = {ELEMENTWISE[type(m)] for u in units for m in list(u.post) + list(u.prefix) if type(m) in ELEMENTWISE}
        acts.discard("linear")
        # phi of the model (what TP's trainable feedback g_l = phi(V a + c) applies): its one elementwise activation
        activation = next(iter(acts)) if len(acts) == 1 else "linear"
        super().__init__(param or Parameterization(name="sp"), width, K, activation, True, dtype, device)
        self.mixed_activations = sorted(acts) if len(acts) > 1 else []
        if self.mixed_activations:
            self.activation = "mixed"
        self.input_shape = tuple(int(s) for s in input_shape)
        self.spec = spec
        if len(out_shape) != 1:
            raise ConfigError(f"the model's output has per-sample shape {out_shape}; mulocal needs (classes,)")
        self.out_dim = int(out_shape[0])
        self.units = units
        n_res = sum(u.residual for u in units)
        self.blocks = n_res
        H = n_res + 2  # the residual rules' depth: d = n_res / (H_0 - 2)
        self.layers = [self._layer(u, H) for u in units]
        self._res = [u.residual for u in units]
        self._posts = [list(prefix)] + [list(u.post) + list(nxt.prefix) for u, nxt in zip(units, units[1:])]
        self._lin = [self._elementwise(m) for m in self._posts]
        self._pools = [posts.from_modules(m) for m in self._posts]  # pooled posts: written out (posts.py)
        self.init(seeds if seeds is not None else range(K))
        probe = torch.zeros(K, 2, *self.input_shape, dtype=dtype, device=self.device)
        self._u_shapes = {}
        with torch.no_grad():
            a = self.prepare_input(probe)
            u_prev = a
            for l, layer in enumerate(self.layers, start=1):
                if isinstance(layer, ModuleLayer):
                    layer.probe(a)
                u = self.predict(l, a, u_prev)
                self._u_shapes[l] = tuple(u.shape[2:])
                if l < self.depth:
                    a, u_prev = self.post(l, u), u

    def _layer(self, unit, H):
        p, W, K, dt, dev = self.param, self.width, self.K, self.dtype, self.device
        res = unit.residual
        rule = p.rule(unit.role, _unit_fan_in(unit), W, depth=H if res else None, residual=res)
        if unit.kind == "affine":
            core = unit.core
            if isinstance(core, nn.Linear):
                cls = Branch if res else Dense
                return cls(unit.role, core.in_features, core.out_features, K, core.bias is not None, rule, dt, dev)
            cls = AffineConvBranch if res else AffineConv
            in_hw = unit.in_shape[1:]
            return cls(unit.role, core, in_hw, K, rule, dt, dev)
        rules = [p.rule(s.role if s.matrix else unit.role, s.fan_in, W, depth=H if res else None, residual=res)
                 for s in unit.params]
        mode = "plain" if not res else ("branch" if unit.branch is not None else "block")
        module = unit.branch if mode == "branch" else unit.module
        return ModuleLayer(unit.name, module, unit.params, rules, rule, mode, K, dt, dev)

    @staticmethod
    def _elementwise(mods):
        if not mods:
            return "identity"
        if len(mods) == 1 and type(mods[0]) in ELEMENTWISE:
            return ELEMENTWISE[type(mods[0])]
        return None

    # ---------------------------------------------------------------- structure
    @property
    def plain_mlp(self) -> bool:
        """Whether the model is an MLP as ``nets.MLP`` computes it: Linear units only, no residual one, the model's
        one activation (tanh, relu, linear) alone between them (PC's fused parallel step applies: algos/pc/fused.py)."""
        return (all(type(layer) is Dense for layer in self.layers) and not any(self._res)
                and self.activation in ("tanh", "relu", "linear")
                and all(kind == self.activation or (kind == "identity" and self.activation == "linear")
                        for kind in self._lin[1:]))

    @property
    def rule_depth(self) -> int:
        """The residual units plus the input and output layers: d = (number of residual units) / (H_0 - 2)."""
        return self.blocks + 2

    def residual(self, l: int) -> bool:
        return self._res[l - 1]

    @property
    def residual_net(self) -> bool:
        return any(self._res)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """As ``Net.prepare_input``; an input shared by the replicas goes through the input's modules once and is
        then expanded over K (a view, as the native nets' flattened input: no K copies)."""
        x = torch.as_tensor(x)
        if x.dim() == len(self.input_shape) + 1 and tuple(x.shape[1:]) == self.input_shape:
            a = self.post(0, x.to(self.device, self.dtype).unsqueeze(0))
            return a.expand(self.K, *a.shape[1:])
        return super().prepare_input(x)

    def post(self, l, u):
        mods = self._posts[l]
        if not mods:
            return u
        if posts.applies(self._pools[l], u):
            return posts.post(self._pools[l], u)
        K, B = u.shape[:2]
        y = u.reshape(K * B, *u.shape[2:])
        for m in mods:
            y = m(y)
        return y.reshape(K, B, *y.shape[1:])

    def _needs_vjp(self, l):
        return self._lin[l] is None  # other modules than one elementwise activation (a pooled post)

    def linearize(self, l, u, a=None):
        kind = self._lin[l]
        if kind == "identity" or kind == "linear":
            return lambda g: g
        if kind == "tanh":
            return ((1 - a * a) if a is not None else (1 - torch.tanh(u) ** 2)).mul
        if kind == "relu":
            return (u > 0).to(u.dtype).mul
        return super().linearize(l, u, a)  # a pooled post: the vjp (_needs_vjp)

    def unflattened_shapes(self) -> dict:
        """{l: the shape of a_l before the model's Flatten} for the units whose activity is flattened (TP's conv
        feedback reads a_l as an image)."""
        out = {}
        for l in range(1, self.depth):
            mods = self._posts[l]
            if any(isinstance(m, nn.Flatten) for m in mods):
                y = torch.zeros(1, *self._u_shapes[l], dtype=self.dtype, device=self.device)
                with torch.no_grad():
                    for m in mods:
                        if not isinstance(m, nn.Flatten):
                            y = m(y)
                out[l] = tuple(y.shape[1:])
        return out

    def feedback_blocker(self, feedback: str = "trainable") -> str | None:
        """Why target propagation cannot build its feedback on this model (None: it can): TP/DTP's feedback maps are
        built for Linear and Conv2d units and residual blocks (whatever their branch: the feedback branch is the
        stream's own h + a (V phi(h) + c), a conv of the block's first kernel size on an image stream); trainable
        feedback g_l = phi(V a + c) needs the model's one activation phi."""
        for u, layer in zip(self.units[1:], self.layers[1:]):
            if isinstance(layer, ModuleLayer) and not u.residual:
                return (f"model layer {u.name} ({type(u.module).__name__}) is not a Linear or Conv2d unit or a residual "
                        f"block, and mulocal builds feedback only for those (use --feedback ridge, or BP / PC on it)")
        if feedback == "trainable" and self.mixed_activations:
            return (f"the model mixes the activations {', '.join(self.mixed_activations)}; trainable feedback "
                    f"phi(V a + c) needs one (use --feedback linear or ridge)")
        return None

    def config(self) -> dict:
        return dict(kind=self.kind, model=self.spec, in_shape=list(self.input_shape), width=self.width,
                    out_dim=self.out_dim, depth=self.depth, K=self.K)

    def tensor_table(self, lr: float = 1.0) -> list[dict]:
        """Each unit's tensors as read and scaled: unit, tensor, role, shape, fan-in, init std, multiplier, lr (at
        ``lr``), residual branch multiplier."""
        rows = []
        for u, layer in zip(self.units, self.layers):
            for t, kind, name, role, fan, std, mult in _rows(u, layer):
                scale = layer.rule.lr_scale if kind == "weight" else layer.rule.bias_lr_scale
                rows.append(dict(unit=u.name, tensor=name, role=role, shape=list(t.shape[1:]), fan_in=fan,
                                 init_std=std, mult=mult, lr=lr * scale, residual=u.residual,
                                 branch=getattr(layer.rule, "branch", 1.0)))
        return rows

    def describe(self, lr: float = 1.0) -> str:
        """Each unit's tensors: role, fan-in, init std, multiplier, learning rate (at ``lr``)."""
        lines = [f"model {self.spec or ''} at width {self.width} (base width {self.param.base_width}, "
                 f"{self.param.name}): {self.depth} units, {self.blocks} residual"
                 + (f" (d = {self.blocks}/(H_0 - 2): branch multiplier "
                    f"{self.layers[[u.residual for u in self.units].index(True)].rule.branch:.4g})" if self.blocks else "")]
        lines.append(f"  {'unit':<14}{'tensor':<18}{'role':<11}{'shape':>18}{'fan-in':>8}{'init std':>11}"
                     f"{'mult':>8}{'lr':>11}")
        for r in self.tensor_table(lr):
            lines.append(f"  {r['unit'] + (' (res)' if r['residual'] else ''):<14}{r['tensor']:<18}{r['role']:<11}"
                         f"{'x'.join(map(str, r['shape'])):>18}{r['fan_in']:>8}{r['init_std']:>11.4g}"
                         f"{r['mult']:>8.4g}{r['lr']:>11.4g}")
        return "\n".join(lines)


def _unit_fan_in(unit) -> int:
    return next((s.fan_in for s in unit.params if s.matrix), 1)


def _rows(unit, layer):
    if isinstance(layer, ModuleLayer):
        for t, s, r, m in zip(layer.params, layer.specs, layer.rules, layer.mults):
            yield t, ("weight" if s.matrix else "bias"), s.name, s.role, s.fan_in, (r.init_std if s.matrix else 0.0), m
        return
    yield layer.weight, "weight", "weight", layer.rule.role, layer.fan_in, layer.rule.init_std, layer.mult
    if layer.bias is not None:
        yield layer.bias, "bias", "bias", ("vector-out" if layer.rule.role == "output" else "vector"), 1, 0.0, 1.0
