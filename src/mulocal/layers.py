"""The native nets' layers, each weight with a leading replica dimension K (``nets`` builds the nets from them).

``Dense`` (W of shape (K, out, in): ``bmm`` over (K, B, features)) and ``Conv`` (W of shape (K, c_out, c_in, kh, kw):
one grouped convolution over the K replicas), and their residual branches ``Branch`` / ``ConvBranch``. Each gives the
three local operations every learning rule needs, without autograd: ``forward`` (u = mult W a + b),
``backward_input`` (mult W^T delta) and ``grads`` (delta a^T averaged over the batch, and the bias's mean delta).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight


class Layer:
    """What every layer gives the learning rules besides ``forward`` / ``backward_input`` / ``grads``: its trainable
    tensors in order (``tensors``), their kinds (``kinds``: "weight" reads ``rule.lr_scale``, "bias"
    ``rule.bias_lr_scale``) and the gradients of sum(delta * u) / B aligned with ``tensors`` (``param_grads``).
    A layer with several tensors (``adapter.ModuleLayer``) overrides all three."""

    linear_in_input = True  # backward_input(delta, a) does not read a

    def tensors(self) -> list:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def kinds(self) -> list:
        return ["weight"] if self.bias is None else ["weight", "bias"]

    def param_grads(self, delta, a) -> list:
        gw, gb = self.grads(delta, a)
        return [gw] if gb is None else [gw, gb]

    def draw(self, k: int, gen: torch.Generator) -> None:
        """Replica k's start from ``gen`` (its seed's ``init`` stream): W ~ N(0, init_std^2) drawn in float64 on the
        CPU, then cast; the bias at zero."""
        w = torch.randn(self.weight.shape[1:], generator=gen, dtype=torch.float64) * self.rule.init_std
        self.weight[k].copy_(w)
        if self.bias is not None:
            self.bias[k].zero_()


class Dense(Layer):
    """u = mult * a W^T + b with W of shape (K, out, in)."""

    def __init__(self, role, fan_in, fan_out, K, bias, rule, dtype, device):
        self.role, self.fan_in, self.fan_out, self.rule = role, fan_in, fan_out, rule
        self.mult = rule.multiplier
        self.weight = torch.zeros(K, fan_out, fan_in, dtype=dtype, device=device)
        self.bias = torch.zeros(K, fan_out, dtype=dtype, device=device) if bias else None

    def forward(self, a, weight=None, bias=None):
        """Apply the layer (``weight`` / ``bias`` override the layer's own; ``bias=False`` drops it)."""
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else (None if bias is False else bias)
        if b is None:
            out = torch.bmm(a, w.transpose(1, 2))
            return out.mul_(self.mult) if self.mult != 1 else out
        return torch.baddbmm(b.unsqueeze(1), a, w.transpose(1, 2), alpha=self.mult)

    def backward_input(self, delta, a=None):
        """W^T delta (times the multiplier): the layer is linear in its input, so ``a`` (its input) is not read."""
        out = torch.bmm(delta, self.weight)
        return out.mul_(self.mult) if self.mult != 1 else out

    def grads(self, delta, a):
        """Batch-mean gradient of sum(delta * u) w.r.t. (W, b)."""
        gw = torch.bmm(delta.transpose(1, 2), a).mul_(self.mult / delta.shape[1])
        gb = delta.mean(1) if self.bias is not None else None
        return gw, gb


class _Branch:
    """A residual branch a (mult W x + b): the layer with the branch multiplier a = rule.branch folded into
    ``mult`` (so ``backward_input`` and the weight gradient carry it) and applied to the bias too. Mixed into
    ``Dense`` (``Branch``) and ``Conv`` (``ConvBranch``)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.branch = self.rule.branch
        self.mult = self.rule.multiplier * self.rule.branch

    def forward(self, a, weight=None, bias=None):
        b = self.bias if bias is None else (None if bias is False else bias)
        return super().forward(a, weight, False if b is None else b * self.branch)

    def grads(self, delta, a):
        gw, gb = super().grads(delta, a)  # the weight gradient carries a through mult
        return gw, (gb.mul_(self.branch) if gb is not None else None)


class Branch(_Branch, Dense):
    """A dense residual branch a (mult W x + b)."""


class Conv(Layer):
    """2-D convolution per replica, as one grouped convolution: same-padded k x k by default (the native nets'); a
    user's ``nn.Conv2d`` (``adapter``) gives its kernel (kh, kw), stride, padding, dilation and input size ``in_hw``
    (W^T delta's output padding puts back the rows a stride dropped)."""

    def __init__(self, role, c_in, c_out, k, K, bias, rule, dtype, device, stride=1, padding=None, dilation=1,
                 in_hw=None):
        kh, kw = (k, k) if isinstance(k, int) else tuple(k)
        self.role, self.fan_in, self.fan_out, self.rule, self.k = role, c_in * kh * kw, c_out, rule, kh
        self.c_in, self.c_out, self.K, self.mult = c_in, c_out, K, rule.multiplier
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = (kh // 2, kw // 2) if padding is None else _pair(padding)
        self.out_padding = (0, 0)
        if in_hw is not None:  # n_out = (n + 2 p - d (k - 1) - 1) // s + 1; the transpose maps back to n_out's span
            self.out_padding = tuple(
                n - (((n + 2 * p - d * (q - 1) - 1) // s) * s - 2 * p + d * (q - 1) + 1)
                for n, s, p, d, q in zip(in_hw, self.stride, self.padding, self.dilation, (kh, kw)))
        self.weight = torch.zeros(K, c_out, c_in, kh, kw, dtype=dtype, device=device)
        self.bias = torch.zeros(K, c_out, dtype=dtype, device=device) if bias else None

    def _group(self, a):  # (K, B, C, H, W) -> (B, K*C, H, W)
        K, B = a.shape[:2]
        return a.transpose(0, 1).reshape(B, K * a.shape[2], *a.shape[3:])

    def _ungroup(self, y):  # (B, K*C, H, W) -> (K, B, C, H, W)
        B = y.shape[0]
        return y.reshape(B, self.K, -1, *y.shape[2:]).transpose(0, 1)

    def forward(self, a, weight=None, bias=None):
        """Apply the layer (``weight`` / ``bias`` override the layer's own; ``bias=False`` drops it)."""
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else (None if bias is False else bias)
        y = F.conv2d(self._group(a), w.reshape(-1, *w.shape[2:]), None, self.stride, self.padding, self.dilation,
                     groups=self.K)
        y = self._ungroup(y)
        if self.mult != 1:
            y = y * self.mult
        return y if b is None else y + b[:, None, :, None, None]

    def backward_input(self, delta, a=None):
        w = self.weight.reshape(-1, *self.weight.shape[2:])
        g = F.conv_transpose2d(self._group(delta), w, None, self.stride, self.padding, self.out_padding,
                               groups=self.K, dilation=self.dilation)
        return self._ungroup(g) * self.mult

    def grads(self, delta, a):
        # One ungrouped weight-gradient call per replica: CPU kernels for grouped weight gradients
        # with few input channels per group are over 10x slower.
        B = delta.shape[1]
        gw = torch.stack([conv2d_weight(a[k], self.weight.shape[1:], delta[k], self.stride, self.padding,
                                        self.dilation) for k in range(self.K)]).mul_(self.mult / B)
        gb = delta.sum((3, 4)).mean(1) if self.bias is not None else None
        return gw, gb


class ConvBranch(_Branch, Conv):
    """A convolutional residual branch a (mult conv(W, x) + b) (same padding: the stream keeps its shape)."""


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)
