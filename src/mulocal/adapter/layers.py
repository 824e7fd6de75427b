"""The layers a user's model runs as: a general convolution (``AffineConv``) and any module with parameters
(``ModuleLayer``), each with a leading replica dimension K like the native layers (``layers.Dense`` / ``layers.Conv``).

Both give the learning rules the native layer interface (``layers.Layer``): ``forward``, ``backward_input(delta, a)``
= (d layer / d a)^T delta, ``param_grads(delta, a)`` = d sum(delta * layer(a)) / d theta / B, ``tensors``, ``kinds``.
``ModuleLayer`` computes the last two by local autograd inside the module (``torch.func.vjp`` at its own input):
never through another layer.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import ConfigError, MulocalWarning
from ..layers import Conv, Layer, _Branch


class AffineConv(Conv):
    """A user's ``nn.Conv2d`` (one group, zero padding; any kernel, stride, padding, dilation) per replica: the native
    ``layers.Conv`` with the module's hyperparameters, W of shape (K, c_out, c_in, kh, kw)."""

    def __init__(self, role, conv: nn.Conv2d, in_hw, K, rule, dtype, device):
        super().__init__(role, conv.in_channels, conv.out_channels, conv.kernel_size, K, conv.bias is not None, rule,
                         dtype, device, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                         in_hw=tuple(int(s) for s in in_hw))


class AffineConvBranch(_Branch, AffineConv):
    """A residual branch a (mult conv(W, x) + b) of a user's convolution (its padding keeps the stream's shape)."""


class ModuleLayer(Layer):
    """Any module with parameters, K replicas of it in one call: ``torch.func.functional_call`` of the module with
    each replica's tensors, batched over K by ``torch.func.vmap`` (a module vmap cannot batch runs its K replicas
    one by one, with a warning saying why).

        forward(a)   = scale * g(a; mult_p * theta_p)         g: the module, or its branch (residual: see mode)

    ``mode``: "plain" (g = the module), "branch" (a residual block whose branch is known: g = the branch), "block"
    (a residual block read by probing: g(a) = block(a) - a). ``scale`` is the residual branch multiplier (1
    elsewhere); ``mult_p`` each matrix's width multiplier (``Parameterization.rule``).
    """

    linear_in_input = False

    def __init__(self, name, module: nn.Module, specs, rules, unit_rule, mode, K, dtype, device):
        self.name, self.mode, self.K = name, mode, K
        self.module = copy.deepcopy(module).to(dtype=dtype, device=device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.specs, self.rules, self.rule, self.role = specs, rules, unit_rule, unit_rule.role
        self.names = [s.name for s in specs]
        self.mults = [r.multiplier if s.matrix else 1.0 for s, r in zip(specs, rules)]
        self.scale = unit_rule.branch
        self.params = [torch.zeros(K, *s.shape, dtype=dtype, device=device) for s in specs]
        matrices = [p for p, s in zip(self.params, specs) if s.matrix]
        self.weight = matrices[0] if matrices else self.params[0]  # what a diagnostic reads as "the" weight
        self.bias = None
        self.fan_in = next((s.fan_in for s in specs if s.matrix), 1)
        conv = next((m for m in self.module.modules() if isinstance(m, nn.Conv2d)), None)
        self.k = conv.kernel_size[0] if conv is not None else 3  # a residual block's feedback conv (TP)
        self.batched, self.why_unbatched = True, ""

    # ---------------------------------------------------------------- one replica, then K
    def _one(self, ps, x):
        d = {n: (p * m if m != 1 else p) for n, p, m in zip(self.names, ps, self.mults)}
        if self.mode == "block":
            y = torch.func.functional_call(self.module, d, (x,)) - x
        else:
            y = torch.func.functional_call(self.module, d, (x,))
        return y * self.scale if self.scale != 1 else y

    def _all(self, ps, a):
        if self.batched:
            return torch.func.vmap(self._one)(tuple(ps), a)
        return torch.stack([self._one([p[k] for p in ps], a[k]) for k in range(self.K)])

    def probe(self, a) -> None:
        """Check that vmap batches the module over K (else run replicas one by one, and warn once with why)."""
        try:
            self._all(self.params, a)
        except Exception as err:  # noqa: BLE001 - any failure of vmap: fall back, say why
            self.batched, self.why_unbatched = False, f"{type(err).__name__}: {str(err).splitlines()[0]}"
            warnings.warn(f"model layer {self.name} cannot be batched over replicas by torch.func.vmap "
                          f"({self.why_unbatched}); its K replicas run one by one", MulocalWarning, stacklevel=3)
            self._all(self.params, a)

    # ---------------------------------------------------------------- the layer interface
    def draw(self, k: int, gen: torch.Generator) -> None:
        """Replica k's start from ``gen``: each matrix ~ N(0, its init_std^2) (float64, then cast), in the module's
        parameter order; biases at zero; other vector-like tensors (norm gains) at the module's own values."""
        start = dict(self.module.named_parameters())
        for t, s, r in zip(self.params, self.specs, self.rules):
            if s.matrix:
                t[k].copy_(torch.randn(s.shape, generator=gen, dtype=torch.float64) * r.init_std)
            elif s.bias:
                t[k].zero_()
            else:
                t[k].copy_(start[s.name].detach())

    def tensors(self) -> list:
        return list(self.params)

    def kinds(self) -> list:
        return ["weight" if s.matrix else "bias" for s in self.specs]

    def forward(self, a, weight=None, bias=None):
        if weight is not None or bias is not None:
            raise ConfigError(f"model layer {self.name} is not linear in its weights: it takes no weight override")
        return self._all(self.params, a)

    def backward_input(self, delta, a=None):
        """(d forward / d a)^T delta at a (local autograd: vjp of this layer alone)."""
        if a is None:
            raise ConfigError(f"model layer {self.name} is not linear in its input: backward_input needs it")
        _, vjp = torch.func.vjp(lambda x: self._all(self.params, x), a)
        return vjp(delta)[0]

    def param_grads(self, delta, a) -> list:
        """d sum(delta * forward(a)) / d theta / B for every tensor (local autograd: vjp of this layer alone)."""
        _, vjp = torch.func.vjp(lambda *ps: self._all(ps, a), *self.params)
        B = delta.shape[1]
        return [g.div_(B) for g in vjp(delta)]

    def grads(self, delta, a):
        raise ConfigError(f"model layer {self.name} has several tensors: use param_grads")

    # ---------------------------------------------------------------- what a coordinate check reads
    @property
    def matrix_index(self) -> int:
        """The index in ``tensors()`` of ``weight`` (the first matrix)."""
        return next((i for i, t in enumerate(self.params) if t is self.weight), 0)

    def own_change(self, a, start) -> torch.Tensor:
        """g(a; theta) - g(a; theta_start): the change of the unit's output caused by its own tensors at input a."""
        return self._all(self.params, a) - self._all(start, a)

    def input_change(self, a, a_start, start) -> torch.Tensor:
        """g(a; theta_start) - g(a_start; theta_start): the change caused by its input through the frozen unit."""
        return self._all(start, a) - self._all(start, a_start)
