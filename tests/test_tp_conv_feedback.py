"""TP / DTP conv feedback: its loss is a mean over the positions of its output map (issue 25, item 2).

A conv feedback weight is shared by every position of its output, so the gradient of a loss summed over the
positions is a sum of P_l per-position terms and grows like P_l (196 on FashionMNIST's 14 x 14 maps): the feedback
LR then meant ~196 times more on a CNN than on an MLP. Written here from the raw weights (nothing from ``mulocal``
but the weights, multipliers and the rule's recorded noise), for layer l's feedback g_l with output shaped like
h_{l-1}:

    L_l = (1/B) sum_b (1/P_l) sum_p  ell_{b,p},      ell_{b,p} = sum over the channels c of the documented loss

(rec: 1/2 (g(f(h + xi)) - (h + xi))^2, drl: 1/2 (g(f(h + xi)) - g(f(h)) - xi)^2, ldrl: -xi (g(f(h + xi)) - g(f(h)))
+ 1/2 (g(f(h) + eta) - g(f(h)))^2, each at (c, p)), P_l = H W of h_{l-1}'s map for conv feedback (the CNN's
upsampling + conv, a residual CNN block's conv branch g(t) = t + a (n conv(V, phi(t)) + c)) and P_l = 1 with the
sum over all coordinates for dense feedback (the CNN's g_L, the residual CNN's g_H onto the flattened stream: a
dense weight is not shared, its gradient does not grow with P).

* oracles: the gradients handed to the feedback optimizer = autograd of L_l in (V_l, c_l), and ``fb_loss_l`` = L_l,
  float64, TP and DTP, CNN (two conv feedbacks of different, non-square P) and residual CNN;
* scaling: an image tiled 2 x 2 (4 P positions, every per-position term repeated 4 times, exactly: content in the
  middle, zero borders wide enough that no kernel reaches a seam, no forward bias, no noise) gives the same feedback
  update as the image itself (a mean of 4 copies of the same terms); the summed gradient is 4 times larger;
* cells with trained conv feedback record ``conv_fb_loss = "position_mean"`` (a new hash), every other cell nothing.

Tolerance: float64 compositions of a few convolutions and products on O(1) numbers (tests/oracles.py): 1e-10
relative leaves orders of margin over rounding, while the old sum (a factor P_l = 12..48 here) or a wrong P
fails it by far.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mulocal.algos import defaults_of, make_algo
from mulocal.algos.tp import CONV_FB_LOSS, TP, ConvFeedbackBranch, UpConvFeedback
from mulocal.nets import build
from mulocal.param import preset
from oracles import PHI, _lin, close
from oracles import WrittenResNet as Written

BASE = 4


# ----------------------------------------------------------------------------- set-up
def _cnn(shape=(1, 16, 12), depth=4, bias=True, K=2):
    """A float64 CNN away from its base width (multipliers != 1), with random forward biases. Depth 4 on 16 x 12:
    h_1 (C, 8, 6), h_2 (C, 4, 3), h_3 (C, 2, 1) flattened: conv feedback g_2 (P = 48) and g_3 (P = 12), dense g_4."""
    p = preset("mup", "sgd", algo="dtp", base_width=BASE, a=(-0.5, 0.5, 1.0))
    net = build("cnn", shape, 3, 6, p, depth=depth, K=K, bias=bias, seeds=[1, 2][:K], dtype=torch.float64)
    return net, _random_biases(net, bias, 7)


def _rescnn(shape=(2, 8, 12), depth=5, bias=True, K=2):
    """A float64 residual CNN (stream (C, 4, 6): P = 24 for the blocks' conv feedback), multipliers != 1."""
    p = preset("mup", "sgd", algo="dtp", base_width=BASE).with_(a=(0.0, 0.25, 0.5), depth_alpha=0.5)
    net = build("rescnn", shape, 4, 6, p, depth=depth, K=K, bias=bias, seeds=[3, 4][:K], dtype=torch.float64)
    return net, _random_biases(net, bias, 11)


def _random_biases(net, bias: bool, seed: int) -> torch.Generator:
    """Random (non-zero) forward biases, drawn from a generator seeded ``seed``, which is returned for further draws."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers if bias else []:
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
    return gen


def _record(algo, net, x, apply=False):
    """One feedback-training pass on the batch x: the noise draws, the gradients handed to the optimizer (not
    applied unless ``apply``) and the statistics. The feedback biases are random (non-zero)."""
    algo.setup(net)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for l in sorted(algo.fb):
            algo.fb[l].bias.copy_(0.2 * torch.randn(algo.fb[l].bias.shape, generator=gen, dtype=torch.float64))
    fbw = {l: (fb.weight.clone(), fb.bias.clone()) for l, fb in algo.fb.items()}
    draws, passed = [], []
    orig_noise, orig_step = algo._noise, algo.fb_opt.step

    def noise(like, s):
        n = orig_noise(like, s)
        draws.append(n.clone())
        return n

    def step(g):
        passed.append([t.clone() for t in g])
        if apply:
            orig_step(g)
    algo._noise, algo.fb_opt.step = noise, step
    us, acts = net.forward(x)
    stats = algo.train_feedback(net, algo.space(net, us, acts), us[-1])
    return fbw, draws, passed[0], stats


def _per_sample(terms, conv):
    """The written per-sample loss from its terms (K, B, ...): a conv feedback's map (K, B, C, H, W) summed over the
    channels and averaged over its P = H W positions; a dense feedback's output summed over every coordinate."""
    if conv:
        return terms.sum(2).mean((-2, -1))
    return terms.flatten(2).sum(-1)


def _written_loss(fb_loss, g, fwd, hp, hl, xi, eta, conv):
    """L_l = mean_b per-sample loss (K,), and the residual r (K, B, ...) whose RMS is rec_err_l."""
    a_n = hp + xi
    g_n = g(fwd(a_n))
    if fb_loss == "rec":
        r = g_n - a_n
        terms = 0.5 * r.pow(2)
    else:
        g_0 = g(hl)
        r = g_n - g_0 - xi
        terms = 0.5 * r.pow(2) if fb_loss == "drl" else -xi * (g_n - g_0) + 0.5 * (g(hl + eta) - g_0).pow(2)
    return _per_sample(terms, conv).mean(1), r


def _compare(stats, passed, expect, L):
    """stats' fb_loss_l and the optimizer's gradients against the written (value, rms, (dV, dc)) per layer."""
    for i, l in enumerate(range(2, L + 1)):
        value, rms, (eV, ec) = expect[l]
        ok, err = close(stats[f"fb_loss_{l}"], value)
        assert ok, (l, "fb_loss", err)
        ok, err = close(stats[f"rec_err_{l}"], rms)
        assert ok, (l, "rec_err", err)
        top = max(float(eV.abs().max()), float(ec.abs().max()))  # linear drl / ldrl: the bias gradient is 0
        for what, got, e in (("V", passed[2 * i], eV), ("c", passed[2 * i + 1], ec)):
            ok, err = close(got, e, scale=top)
            assert ok, (l, what, err)


# ----------------------------------------------------------------------------- CNN: written net and feedback
def cnn_layer(net, l, a):
    """h_l from h_{l-1}: maxpool_2(phi(m W * a + b)) (flattened at the last conv), f = m W a + b at l = L."""
    layer = net.layers[l - 1]
    if l == net.depth:
        return _lin(a.flatten(2), layer.weight, layer.bias, layer.mult)
    u = _lin(a, layer.weight, layer.bias, layer.mult)
    K, B = u.shape[:2]
    h = F.max_pool2d(PHI[net.activation](u).reshape(K * B, *u.shape[2:]), 2)
    h = h.reshape(K, B, *h.shape[1:])
    return h.flatten(2) if l == net.depth - 1 else h


def cnn_shapes(net):
    """The unflattened (C, H, W) of h_0..h_{L-1}: each conv keeps the size, each pooling halves it (floor)."""
    shapes = [tuple(net.input_shape)]
    for _ in range(1, net.depth):
        shapes.append((net.width, shapes[-1][1] // 2, shapes[-1][2] // 2))
    return shapes


def cnn_feedback(net, algo, l, v, V, c, shapes):
    """g_l(v): dense n V v + c (g_L), or nearest upsampling of v's map (C_l, h, w) to h_{l-1}'s (H, W) (index floor(i
    h / H)) then n conv(V, .) + c; phi of it for trainable feedback."""
    n = algo.fb[l].mult
    if V.dim() == 3:
        z = _lin(v.flatten(2), V, c, n)
    else:
        K, B = v.shape[:2]
        v = v.reshape(K, B, *shapes[l])
        (H, W), (h, w) = shapes[l - 1][1:], shapes[l][1:]
        v = v[..., (torch.arange(H) * h) // H, :][..., (torch.arange(W) * w) // W]
        z = _lin(v, V, c, n)
    return PHI[net.activation](z) if algo.feedback == "trainable" else z


def cnn_expected(net, algo, x, fbw, draws, fb_loss):
    L, shapes = net.depth, cnn_shapes(net)
    h = [x]
    for l in range(1, L + 1):
        h.append(cnn_layer(net, l, h[-1]))
    per = 2 if fb_loss == "ldrl" else 1
    out = {}
    for i, l in enumerate(range(2, L + 1)):
        V, c = (t.clone().requires_grad_() for t in fbw[l])

        def g(v):
            return cnn_feedback(net, algo, l, v, V, c, shapes)
        eta = draws[per * i + 1] if per == 2 else None
        value, r = _written_loss(fb_loss, g, lambda a: cnn_layer(net, l, a), h[l - 1], h[l], draws[per * i], eta,
                                 conv=l < L)
        out[l] = (value.detach(), r.detach().flatten(1).pow(2).mean(1).sqrt(), torch.autograd.grad(value.sum(), [V, c]))
    return out


CNN_CASES = [("dtp", "trainable", "rec"), ("tp", "trainable", "rec"), ("dtp", "trainable", "ldrl"),
             ("tp", "linear", "drl"), ("dtp", "linear", "rec")]


@pytest.mark.parametrize("rule,feedback,fb_loss", CNN_CASES)
def test_cnn_conv_feedback_gradient_is_the_position_mean_loss(rule, feedback, fb_loss):
    """CNN: the feedback gradients = autograd of (1/B) sum_b (1/P_l) sum_p ell_{b,p} for the conv feedback g_2
    (P = 8 x 6) and g_3 (P = 4 x 3), and of the batch mean of the summed loss for the dense g_4."""
    net, gen = _cnn()
    x = torch.randn(2, 3, *net.input_shape, generator=gen, dtype=torch.float64)
    algo = make_algo(rule, loss="ce", feedback=feedback, fb_loss=fb_loss, sigma=0.2, fb_iters=1, fb_lr=0.05)
    fbw, draws, passed, stats = _record(algo, net, x)
    assert [type(algo.fb[l]) for l in (2, 3)] == [UpConvFeedback] * 2
    assert [algo._positions(l) for l in (2, 3, 4)] == [8 * 6, 4 * 3, 1]
    assert all(fb.mult != 1 for fb in algo.fb.values())
    _compare(stats, passed, cnn_expected(net, algo, x, fbw, draws, fb_loss), net.depth)


def test_cnn_position_mean_oracle_can_fail():
    """Guard: the summed loss (the old rule) and a mean over the wrong positions (h_l's, the feedback's input,
    not h_{l-1}'s) are far off the written loss."""
    net, gen = _cnn()
    x = torch.randn(2, 3, *net.input_shape, generator=gen, dtype=torch.float64)
    algo = make_algo("dtp", loss="ce", sigma=0.2, fb_iters=1, fb_lr=0.05)
    fbw, draws, passed, _ = _record(algo, net, x)
    expect = cnn_expected(net, algo, x, fbw, draws, "rec")
    for i, l, P_in in ((0, 2, 12), (1, 3, 2)):
        eV = expect[l][2][0]
        assert close(passed[2 * i], eV)[0]
        P = algo.fb[l].positions
        assert not close(passed[2 * i] * P, eV, rtol=1e-3)[0]  # summed over positions
        assert not close(passed[2 * i] * P / P_in, eV, rtol=1e-3)[0]  # averaged over the input map's positions


# ----------------------------------------------------------------------------- residual CNN
def rescnn_expected(net, algo, x, fbw, draws, fb_loss):
    """Blocks: g_l(t) = t + a (n conv(V, phi(t) or t) + c) on the stream (C, h, w), loss averaged over its h w
    positions; g_H(f) = n V f + c reshaped to the stream, its loss summed (dense)."""
    ref = Written(net)
    H = net.depth
    h = [v.detach() for v in ref.forward(x)]
    stream = h[1].shape[2:]
    per = 2 if fb_loss == "ldrl" else 1
    out = {}
    for i, l in enumerate(range(2, H + 1)):
        V, c = (t.clone().requires_grad_() for t in fbw[l])
        n = algo.fb[l].rule.multiplier

        def g(t, l=l, V=V, c=c, n=n):
            if l == H:
                return _lin(t, V, c, n).reshape(*t.shape[:2], *stream)
            inp = ref.phi(t) if algo.feedback == "trainable" else t
            return t + ref.a * _lin(inp, V, c, n)
        eta = draws[per * i + 1] if per == 2 else None
        value, r = _written_loss(fb_loss, g, lambda a, l=l: ref.layer(l, a), h[l - 1], h[l], draws[per * i], eta,
                                 conv=l < H)  # g_H is dense: its loss sums every coordinate of the stream
        out[l] = (value.detach(), r.detach().flatten(1).pow(2).mean(1).sqrt(), torch.autograd.grad(value.sum(), [V, c]))
    return out


@pytest.mark.parametrize("rule,feedback,fb_loss", [("dtp", "trainable", "rec"), ("tp", "trainable", "rec"),
                                                   ("dtp", "linear", "drl"), ("tp", "trainable", "ldrl")])
def test_rescnn_conv_feedback_gradient_is_the_position_mean_loss(rule, feedback, fb_loss):
    """Residual CNN: the blocks' conv feedback gradients = autograd of the position-mean loss (P = 4 x 6), g_H's =
    autograd of the summed one."""
    net, gen = _rescnn()
    x = torch.randn(2, 3, *net.input_shape, generator=gen, dtype=torch.float64)
    algo = make_algo(rule, loss="ce", feedback=feedback, fb_loss=fb_loss, sigma=0.3, fb_iters=1, fb_lr=0.05)
    fbw, draws, passed, stats = _record(algo, net, x)
    H = net.depth
    assert all(type(algo.fb[l]) is ConvFeedbackBranch and algo.fb[l].positions == 24 for l in range(2, H))
    assert algo._positions(H) == 1
    _compare(stats, passed, rescnn_expected(net, algo, x, fbw, draws, fb_loss), H)


def test_rescnn_position_mean_oracle_can_fail():
    """Guard: the summed loss (the old rule) on the blocks is far off the written loss."""
    net, gen = _rescnn()
    x = torch.randn(2, 3, *net.input_shape, generator=gen, dtype=torch.float64)
    algo = make_algo("dtp", loss="ce", sigma=0.3, fb_iters=1, fb_lr=0.05)
    fbw, draws, passed, _ = _record(algo, net, x)
    expect = rescnn_expected(net, algo, x, fbw, draws, "rec")
    assert close(passed[0], expect[2][2][0])[0]
    assert not close(passed[0] * 24, expect[2][2][0], rtol=1e-3)[0]


# ----------------------------------------------------------------------------- scaling with the number of positions
def _centred(shape, gen, B=3, content=4):
    """(B, C, S, S) images, zero but for a random content x content square in the middle."""
    x = torch.zeros(B, *shape, dtype=torch.float64)
    lo = shape[-1] // 2 - content // 2
    x[..., lo:lo + content, lo:lo + content] = torch.randn(B, shape[0], content, content, generator=gen,
                                                           dtype=torch.float64)
    return x


@pytest.mark.parametrize("arch", ["cnn", "rescnn"])
def test_feedback_update_does_not_grow_with_the_number_of_positions(arch):
    """The same images at P positions and tiled 2 x 2 at 4 P positions: every per-position term of the feedback
    gradient is repeated exactly 4 times, since each map is the small one tiled (a 32 x 32 image with 4 x 4 content
    in the middle: every map keeps a zero border wider than what a kernel reads (CNN: 6 px at h_1 16 x 16 and 2 at
    h_2 8 x 8 around its upsampled copy; the residual stream 16 x 16: 6 px at h_1, one less per block), no forward
    bias (phi(0) = 0 keeps the borders zero), sigma = 0 (noise would fill them), nearest upsampling by 2 maps tiles
    to tiles). So the position mean, and with it one SGD step of the conv feedback (weights and biases), is the same
    at 4 P, while the position sum (the old rule) is 4 times larger. The conv and feedback weights are the same
    draws at both sizes (only the dense readout and g_L change shape)."""
    gen = torch.Generator().manual_seed(0)
    make = _cnn if arch == "cnn" else _rescnn
    small_x = _centred((1, 32, 32), gen)
    runs = []
    for x in (small_x, small_x.repeat(1, 1, 2, 2)):
        net, _ = make(shape=tuple(x.shape[1:]), depth=3 if arch == "cnn" else 5, bias=False)
        algo = make_algo("dtp", loss="ce", sigma=0.0, fb_iters=1, fb_lr=0.05)
        fbw, _, passed, _ = _record(algo, net, x.expand(2, *x.shape), apply=True)
        conv = [l for l in sorted(algo.fb) if algo._positions(l) > 1]
        steps = {l: (algo.fb[l].weight - fbw[l][0], algo.fb[l].bias - fbw[l][1]) for l in conv}
        runs.append((algo, conv, passed, steps))
    (a1, conv, g1, s1), (a4, conv4, g4, s4) = runs
    assert conv == conv4 == ([2] if arch == "cnn" else [2, 3, 4])
    for l in conv:
        P1, P4 = a1.fb[l].positions, a4.fb[l].positions
        assert P4 == 4 * P1 == 4 * 16 * 16
        for j in (0, 1):  # the gradient handed to the optimizer (V, c), and the step it made
            small, big = g1[2 * (l - 2) + j], g4[2 * (l - 2) + j]
            assert small.abs().max() > 1e-3  # the content reaches the feedback: not 0 = 0
            ok, err = close(big, small)
            assert ok, (l, j, err)
            ok, err = close(big * P4, 4 * (small * P1))  # the position sum, the old rule: 4 times larger
            assert ok, (l, j, err)
            ok, err = close(s4[l][j], s1[l][j])
            assert ok, (l, j, "step", err)
            assert s1[l][j].abs().max() > 0


# ----------------------------------------------------------------------------- what a cell records
def test_only_trained_conv_feedback_cells_record_the_position_mean():
    """``TP.cell_facts`` (recorded in ``algo_resolved``, part of a cell's hash): trained trainable / linear feedback on
    a CNN or residual CNN of depth >= 3 records conv_fb_loss = "position_mean" (stored cells of it summed over the
    positions and hold other numbers); MLPs, residual MLPs, a depth-2 CNN (its only feedback is dense), ridge /
    inverse feedback and feedback never trained record nothing, so their hashes stay."""
    mark = {"conv_fb_loss": CONV_FB_LOSS}
    for rule in ("tp", "dtp"):
        d = defaults_of(rule)
        assert TP.cell_facts(d, "cnn", 3) == TP.cell_facts(d, "rescnn", 4) == mark
        assert TP.cell_facts({**d, "feedback": "linear"}, "cnn", 5) == mark
        assert TP.cell_facts({**d, "fb_iters": 0, "pretrain_epochs": 2}, "rescnn", 3) == mark
        for arch, depth in (("mlp", 3), ("resmlp", 6), ("cnn", 2)):
            assert TP.cell_facts(d, arch, depth) == {}
        for opts in ({"feedback": "ridge"}, {"feedback": "inverse"}, {"fb_iters": 0}):
            assert TP.cell_facts({**d, **opts}, "cnn", 3) == {}


@pytest.mark.parametrize("arch,depth,facts", [("cnn", 3, True), ("rescnn", 4, True), ("mlp", 3, False),
                                              ("cnn", 2, False)])
def test_run_facts_name_the_position_mean_where_conv_feedback_trains(arch, depth, facts):
    """History rows (``run_facts``) say so too, where conv feedback is trained."""
    shape = (1, 8, 8) if "cnn" in arch else (5,)
    net = build(arch, shape, 3, 8, preset("mup", "sgd", algo="dtp"), depth=depth, dtype=torch.float64)
    for opts, trained in (({}, True), ({"fb_iters": 0}, False), ({"feedback": "ridge"}, False)):
        algo = make_algo("dtp", **opts)
        algo.setup(net)
        assert ("conv_fb_loss" in algo.run_facts()) == (facts and trained), opts
        assert algo.run_facts().get("conv_fb_loss", CONV_FB_LOSS) == CONV_FB_LOSS


def test_cell_hash_tells_position_mean_cells_apart():
    """Through ``config.resolved_algo``: a CNN / residual CNN DTP or TP cell records the position mean (a new hash
    for a store), an MLP cell records what it did before (no ``conv_fb_loss``: its hash is unchanged)."""
    from mulocal.config import default_cell, resolved_algo
    for rule in ("tp", "dtp"):
        assert resolved_algo(default_cell(algo=rule, arch="cnn"))["conv_fb_loss"] == CONV_FB_LOSS
        assert resolved_algo(default_cell(algo=rule, arch="rescnn", depth=4))["conv_fb_loss"] == CONV_FB_LOSS
        for cell in (default_cell(algo=rule), default_cell(algo=rule, arch="resmlp", depth=5),
                     default_cell(algo=rule, arch="cnn", algo_options={"feedback": "ridge"})):
            assert "conv_fb_loss" not in resolved_algo(cell)
    assert "conv_fb_loss" not in resolved_algo(default_cell(algo="gnt", arch="cnn"))
