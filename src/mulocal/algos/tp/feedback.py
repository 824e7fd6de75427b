"""The feedback maps g_l (layer l -> l-1) of TP and DTP, how they are built for a net, and their training.

A map is a ``nets`` layer (``Dense``, a residual block's ``Branch``) or one of the two conv maps here
(``UpConvFeedback``, ``ConvFeedbackBranch``), whose gradients are means over their output positions. The feedback
losses (rec, drl, ldrl) and their explicit gradients: ``FeedbackTraining.train_feedback``. Equations: the package's
docstring.
"""
from __future__ import annotations

import math

import torch

from ...layers import Branch, Conv, ConvBranch, Dense
from ...nets import Net


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.flatten(2)


CONV_FB_LOSS = "position_mean"  # what cells with trained conv feedback record (``TP.cell_facts``)


def has_conv_feedback(arch: str, depth: int) -> bool:
    """Whether trainable feedback on this net has a convolutional g_l: the CNN's hidden conv layers (depth >= 3;
    its g_L is dense) and the residual CNN's blocks (depth >= 3)."""
    return arch in ("cnn", "rescnn") and depth >= 3


class UpConvFeedback:
    """CNN feedback from a conv layer's pooled output back to its input: nearest upsampling to the
    input's spatial size, then a same-padded convolution (a transposed convolution of stride 1).
    Its gradient is the mean over the P = H W output positions (``grads``)."""

    def __init__(self, conv_in_shape, out_shape, K, rule, kernel, dtype, device):
        self.in_shape, self.out_shape = tuple(conv_in_shape), tuple(out_shape)  # (C_l, h, w), (C_{l-1}, H, W)
        self.conv = Conv("hidden", self.in_shape[0], self.out_shape[0], kernel, K, True, rule, dtype, device)
        self.rule, self.mult = rule, self.conv.mult
        self.positions = math.prod(self.out_shape[1:])  # P: every weight is applied at each output position

    @property
    def weight(self):
        return self.conv.weight

    @property
    def bias(self):
        return self.conv.bias

    def _up(self, a):
        K, B = a.shape[:2]
        a = a.reshape(K * B, *self.in_shape)
        up = torch.nn.functional.interpolate(a, size=self.out_shape[1:], mode="nearest")
        return up.reshape(K, B, *up.shape[1:])

    def forward(self, a, weight=None, bias=None):
        return self.conv.forward(self._up(a), weight, bias)

    def grads(self, delta, a):
        """Gradient in (V, c) of sum(delta * g(a)) / (B P): batch mean and mean over the P output positions
        (``Conv.grads`` sums the positions: conv2d_weight and the bias's spatial sum)."""
        gw, gb = self.conv.grads(delta, self._up(a))
        return gw.div_(self.positions), gb.div_(self.positions)


class ConvFeedbackBranch(ConvBranch):
    """A residual CNN block's feedback branch a (n conv(V, x) + c) (``ConvBranch``), its gradient the mean over the
    P = h w positions of the stream (``grads``), as ``UpConvFeedback``'s."""

    def __init__(self, *args, positions: int, **kw):
        super().__init__(*args, **kw)
        self.positions = int(positions)

    def grads(self, delta, a):
        """Gradient in (V, c) of sum(delta * branch(a)) / (B P)."""
        gw, gb = super().grads(delta, a)
        return gw.div_(self.positions), gb.div_(self.positions)


def feedback_maps(net: Net, shapes: dict, stream: tuple | None) -> dict:
    """The trainable feedback maps g_2..g_L of ``net`` (zero weights: ``TP.setup`` draws them), by layer:
    ``shapes`` the unflattened activity shape (C, H, W) per layer (conv feedback), ``stream`` the residual stream's
    shape (residual nets, else None)."""
    L = net.depth
    fb = {}
    for l in range(2, L + 1):
        layer = net.layers[l - 1]
        role = "input" if l == L else "hidden"
        if net.residual_net and l == L:  # g_L: output -> stream, linear
            rule = net.param.feedback_rule(role, layer.fan_out, net.width)
            n = math.prod(stream)
            fb[l] = Dense(role, layer.fan_out, n, net.K, True, rule, net.dtype, net.device)
        elif net.residual(l):  # a block's feedback branch, with the block's depth factors
            # the stream's own map h -> h + a (V phi(h) + c) (whatever the block computes: a user's block
            # of several layers gets this one-layer feedback branch, read by its first conv's kernel)
            rule = net.param.feedback_rule(role, layer.fan_in, net.width, depth=net.rule_depth, residual=True)
            c = stream[0]
            if len(stream) == 1:
                fb[l] = Branch(role, c, c, net.K, True, rule, net.dtype, net.device)
            else:
                fb[l] = ConvFeedbackBranch(role, c, c, layer.k, net.K, True, rule, net.dtype, net.device,
                                           positions=math.prod(stream[1:]))
        elif isinstance(layer, Dense):
            rule = net.param.feedback_rule(role, layer.fan_out, net.width)
            fb[l] = Dense(role, layer.fan_out, layer.fan_in, net.K, True, rule, net.dtype, net.device)
        else:  # conv layer of the CNN: feedback by upsampling + convolution
            k = layer.k
            rule = net.param.feedback_rule(role, layer.c_out * k * k, net.width)
            fb[l] = UpConvFeedback(shapes[l], shapes[l - 1], net.K, rule, k, net.dtype, net.device)
    return fb


class FeedbackTraining:
    """The feedback part of ``TP``: g_l, its gradients, and one pass of feedback training. Needs ``fb``, ``feedback``,
    ``fb_loss``, ``fb_iters``, ``fb_opt``, ``_stream`` (``TP.setup``) and the noise (``FeedbackNoise``)."""

    def _g(self, l: int, a: torch.Tensor, net: Net):
        """Feedback g_l(a) and what its weight gradient needs: the pre-activation z (plain nets) or, in a residual
        net, the branch input (phi(a) or a) of a block and the input a of g_L."""
        if net.residual_net:
            if l == net.depth:
                return self.fb[l].forward(a).reshape(*a.shape[:2], *self._stream), a
            b = net.phi(a) if self.feedback == "trainable" else a
            return a + self.fb[l].forward(b), b
        z = self.fb[l].forward(a)
        return (net.phi(z) if self.feedback == "trainable" else z), z

    def _fb_grads(self, l: int, net: Net, r: torch.Tensor, z: torch.Tensor, a: torch.Tensor,
                  g: torch.Tensor | None = None):
        """Gradient in (V_l, c_l) of sum(r * g_l(a)) / (B P_l), with ``(g, z)`` from ``_g(l, a)`` (phi'(z) from
        g = phi(z) where the activation allows: tanh' = 1 - g^2, no second tanh); P_l the positions of a conv
        feedback's output (``_positions``), 1 for dense feedback."""
        if net.residual_net:
            return self.fb[l].grads(_flat(r) if l == net.depth else r, z)
        return self.fb[l].grads(r if self.feedback == "linear" else r * net._dphi(z, g), a)

    def _positions(self, l: int) -> int:
        """P_l: the positions g_l's feedback loss is averaged over (its output map's h w for conv feedback, else 1)."""
        return getattr(self.fb[l], "positions", 1)

    def _fwd(self, net: Net, l: int, a: torch.Tensor) -> torch.Tensor:
        """The forward map h_{l-1} -> h_l between target spaces."""
        if net.residual_net:
            return net.predict(l, net.post(l - 1, a), a)
        u = net.layers[l - 1].forward(a)
        return u if l == net.depth else net.post(l, u)

    def train_feedback(self, net: Net, acts, f, stats: bool = True) -> dict:
        """One feedback-training pass (``fb_iters`` iterations per layer) on a batch's activities.

        Returns per layer l (K,) tensors on the net's device: ``rec_err_l``, the RMS of the residual the loss
        reconstructs (rec: g(f(h + xi)) - (h + xi); drl and ldrl: g(f(h + xi)) - g(f(h)) - xi), and
        ``fb_loss_l``, the batch-mean feedback loss (mean over positions for conv feedback; with ``stats=False``
        nothing: the training path's default, which computes no statistic)."""
        L = net.depth
        sig = self._sigmas(L)
        h = list(acts) + [f]
        want, stats = stats, {}
        for _ in range(self.fb_iters):
            grads = []
            for l in range(2, L + 1):
                xi = self._noise(h[l - 1], sig[l - 1])
                a_n = h[l - 1] + xi
                h_n = self._fwd(net, l, a_n)
                g_n, z_n = self._g(l, h_n, net)

                def fbg(r, z, a, g):
                    return self._fb_grads(l, net, r, z, a, g)
                if self.fb_loss == "rec":
                    r = g_n - a_n
                    value = 0.5 * r.pow(2) if want else None
                    gw, gb = fbg(r, z_n, h_n, g_n)
                else:
                    g_0, z_0 = self._g(l, h[l], net)
                    if self.fb_loss == "drl":
                        r = g_n - g_0 - xi
                        value = 0.5 * r.pow(2) if want else None
                        gw, gb = fbg(r, z_n, h_n, g_n)
                        gw0, gb0 = fbg(-r, z_0, h[l], g_0)
                    else:  # ldrl
                        eta = self._noise(h[l], sig[l - 1])
                        h_e = h[l] + eta
                        g_e, z_e = self._g(l, h_e, net)
                        s = g_e - g_0
                        r = (g_n - g_0 - xi) if want else None  # reported only
                        value = (0.5 * s.pow(2) - xi * (g_n - g_0)) if want else None
                        gw, gb = fbg(-xi, z_n, h_n, g_n)
                        gw0, gb0 = fbg(xi - s, z_0, h[l], g_0)
                        gwe, gbe = fbg(s, z_e, h_e, g_e)
                        gw0, gb0 = gw0 + gwe, gb0 + gbe
                    gw, gb = gw + gw0, gb + gb0
                grads += [gw, gb]
                if want:  # on the device: no host read-back
                    stats[f"rec_err_{l}"] = r.flatten(1).double().pow(2).mean(1).sqrt()
                    stats[f"fb_loss_{l}"] = value.flatten(2).sum(-1).mean(-1).double() / self._positions(l)
            self.fb_opt.step(grads)
        return stats
