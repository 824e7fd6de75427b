"""DTP on a user's VGG-style model (tests/models_user.py ``vgg``: conv pool conv, strided conv pool, flatten, linear,
readout; relu), against the equations written out with torch.nn.functional on the net's own tensors (issue 24):

* each layer's local gradient is the autograd gradient of its local loss (1/B) sum_b 1/2 ||t_l - a_l||^2, summed over
  channels *and positions* (a conv weight's gradient is a sum over its output positions, as backprop's is);
* the targets t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l) through the strided-and-pooled unit (g_3: nearest upsampling of
  the 2 x 2 map to 7 x 7, then a same-padded conv, relu) and the flatten (g_4: dense onto the flattened map);
* a conv feedback map's update is the gradient of its reconstruction loss averaged over its output positions.

These are the facts the diagnosis of DTP's divergence on this model rests on (docs/api.md, "DTP on relu conv nets"):
the local loss of a conv layer sums over positions, so its curvature (the Gram matrix of the layer's input patches,
~ P k^2 C_in E[a]^2 for relu inputs) is width-free under muP but large, and plain SGD on it needs a learning rate far
below the MLP's.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import models_user as U
from mulocal.adapter import ModuleNet
from mulocal.algos import make_algo
from mulocal.param import preset
from oracles import close

F64 = torch.float64
SIDE, WIDTH = 14, 4  # 14 x 14 inputs: maps 14 -> 7 (pool) -> 7 -> 4 (stride 2) -> 2 (pool); s = 2


def _setup(**opts):
    make = functools.partial(U.vgg, side=SIDE)
    net = ModuleNet(make, (1, SIDE, SIDE), WIDTH, preset("mup", "sgd", algo="dtp", base_width=2), K=1, seeds=[5],
                    dtype=F64)
    g = torch.Generator().manual_seed(11)
    x = torch.rand(6, 1, SIDE, SIDE, generator=g, dtype=F64)
    y = torch.randint(0, 10, (6,), generator=g)
    rule = make_algo("dtp", noise_rng="host", **opts)
    return net, x, y, rule


def _wb(layer):
    """(mult W, b) of replica 0."""
    return layer.weight[0] * layer.mult, (layer.bias[0] if layer.bias is not None else None)


def _forward(net, x, params=None):
    """The vgg written out: u_l and a_l = post_l(u_l) (l = 1..4), f; ``params`` overrides (W, b) of layers."""
    p = [_wb(layer) for layer in net.layers]
    if params:
        for l, wb in params.items():
            p[l - 1] = wb
    u1 = F.conv2d(x, p[0][0], p[0][1], padding=1)
    a1 = F.max_pool2d(F.relu(u1), 2)
    u2 = F.conv2d(a1, p[1][0], p[1][1], padding=1)
    a2 = F.relu(u2)
    u3 = F.conv2d(a2, p[2][0], p[2][1], padding=1, stride=2)
    a3 = F.max_pool2d(F.relu(u3), 2).flatten(1)
    u4 = F.linear(a3, p[3][0], p[3][1])
    a4 = F.relu(u4)
    f = F.linear(a4, p[4][0], p[4][1])
    return [x, a1, a2, a3, a4], f


def test_dtp_local_gradients_on_the_user_vgg_are_autograd_of_the_summed_local_losses():
    """grad (W_l, b_l) = d/d(W_l, b_l) of (1/B) sum_b 1/2 ||t_l - a_l(W_l)||^2 (a_l = post_l(layer_l(a_{l-1})), a_{l-1}
    fixed; the readout's ||t_L - f||^2), summed over channels and positions: conv layers (one strided), the flatten,
    the dense layers."""
    net, x, y, rule = _setup()
    grads, _ = rule.step(net, x, y)
    space, f_lib, t = rule._last
    acts, f = _forward(net, x)
    for l in range(1, 5):
        assert close(space[l][0], acts[l])[0], f"a_{l}"
    assert close(f_lib[0], f)[0]
    B = x.shape[0]
    for l in range(1, 6):
        W, b = (v.clone().requires_grad_(True) for v in _wb(net.layers[l - 1]))
        inp = acts[l - 1] if l < 5 else acts[4]
        # layer l alone, on its fixed input: rebuild a_l from a_{l-1} with (W, b)
        if l == 1:
            out = F.max_pool2d(F.relu(F.conv2d(inp, W, b, padding=1)), 2)
        elif l == 2:
            out = F.relu(F.conv2d(inp, W, b, padding=1))
        elif l == 3:
            out = F.max_pool2d(F.relu(F.conv2d(inp, W, b, padding=1, stride=2)), 2).flatten(1)
        elif l == 4:
            out = F.relu(F.linear(inp, W, b))
        else:
            out = F.linear(inp, W, b)
        loss = 0.5 * (out - t[l][0].reshape(out.shape)).pow(2).sum() / B
        gW, gb = torch.autograd.grad(loss, (W, b))
        mult = net.layers[l - 1].mult
        ok, err = close(grads[2 * (l - 1)][0], gW * mult)  # d/dW of the loss through mult W
        assert ok, f"layer {l} weight gradient differs by {err:.3g}"
        ok, err = close(grads[2 * l - 1][0], gb)
        assert ok, f"layer {l} bias gradient differs by {err:.3g}"


def _g(rule, l, a, shape_in, shape_out):
    """g_l(a) written out: dense relu(mult V a + c), or conv relu(conv(nearest-upsample(a), mult V) + c)."""
    fb = rule.fb[l]
    V, c = fb.weight[0] * fb.mult, fb.bias[0]
    if shape_in is None:
        return F.relu(F.linear(a, V, c))
    up = F.interpolate(a.reshape(a.shape[0], *shape_in), size=shape_out[1:], mode="nearest")
    return F.relu(F.conv2d(up, V, c, padding=V.shape[-1] // 2))


def test_dtp_targets_through_the_strided_pooled_unit_and_the_flatten_are_the_written_out_differences():
    """t_L = f - (softmax(f) - onehot(y)); t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l) with g_5, g_4 dense onto the readout's
    and the linear layer's inputs (g_4 onto the flattened 2w x 2 x 2 map) and g_3, g_2 upsampling convs (g_3 reads the
    strided conv's pooled 2 x 2 map, upsampled to 7 x 7)."""
    net, x, y, rule = _setup()
    rule.step(net, x, y)
    _, _, t = rule._last
    acts, f = _forward(net, x)
    C = 2 * WIDTH
    tL = f - (torch.softmax(f, -1) - F.one_hot(y, 10).to(F64))
    assert close(t[5][0], tL)[0]
    t4 = acts[4] + _g(rule, 5, tL, None, None) - _g(rule, 5, f, None, None)
    t3 = acts[3] + _g(rule, 4, t4, None, None) - _g(rule, 4, acts[4], None, None)
    t2 = acts[2] + _g(rule, 3, t3, (C, 2, 2), (C, 7, 7)) - _g(rule, 3, acts[3], (C, 2, 2), (C, 7, 7))
    t1 = acts[1] + _g(rule, 2, t2, (C, 7, 7), (WIDTH, 7, 7)) - _g(rule, 2, acts[2], (C, 7, 7), (WIDTH, 7, 7))
    for l, want in ((4, t4), (3, t3), (2, t2), (1, t1)):
        ok, err = close(t[l][0].reshape(want.shape), want)
        assert ok, f"t_{l} differs by {err:.3g}"


@pytest.mark.parametrize("l", [2, 3])
def test_conv_feedback_of_the_user_vgg_learns_the_position_mean_reconstruction_loss(l):
    """One feedback step (rec, sigma = 0: no noise) moves V_l, c_l of a conv feedback map (g_3 reads the strided conv's
    pooled map) by -fb_lr * lr_scale * the gradient of (1/B) sum_b (1/P) 1/2 ||g_l(f_l(h_{l-1})) - h_{l-1}||^2, P = 49
    the positions of its 7 x 7 output."""
    net, x, y, rule = _setup(sigma=0.0, fb_lr=0.05)
    rule.setup(net)
    V0, c0 = rule.fb[l].weight[0].clone(), rule.fb[l].bias[0].clone()
    acts, f = _forward(net, x)
    rule.prepare(net, *net.forward(x), net.forward(x)[0][-1])
    C = 2 * WIDTH
    shapes = {2: ((C, 7, 7), (WIDTH, 7, 7)), 3: ((C, 2, 2), (C, 7, 7))}
    shape_in, shape_out = shapes[l]
    V, c = V0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
    up = F.interpolate(acts[l].reshape(x.shape[0], *shape_in), size=shape_out[1:], mode="nearest")
    g = F.relu(F.conv2d(up, V * rule.fb[l].mult, c, padding=1))
    P = shape_out[1] * shape_out[2]
    assert P == 49
    loss = 0.5 * (g - acts[l - 1].reshape(g.shape)).pow(2).sum() / (x.shape[0] * P)
    gV, gc = torch.autograd.grad(loss, (V, c))
    lr = 0.05 * rule.fb[l].rule.lr_scale
    ok, err = close(rule.fb[l].weight[0] - V0, -lr * gV)
    assert ok, f"V_{l} step differs by {err:.3g}"
    ok, err = close(rule.fb[l].bias[0] - c0, -lr * rule.fb[l].rule.bias_lr_scale / rule.fb[l].rule.lr_scale * gc)
    assert ok, f"c_{l} step differs by {err:.3g}"
