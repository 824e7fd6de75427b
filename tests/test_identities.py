"""Exact identities: the explicit BP equals autograd; K replicas equal K separate runs."""
import pytest
import torch

from mulocal.algos import make_algo
from mulocal.losses import loss_value
from mulocal.nets import build
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset
from mulocal.train import Trainer, TrainConfig


def _autograd_grads(net, x, y, loss):
    params = [p.detach().clone().requires_grad_() for p in net.params()]
    saved = net.params()
    # Point the layers at the leaf tensors, compute, restore.
    i = 0
    for layer in net.layers:
        layer.weight = params[i]; i += 1
        if layer.bias is not None:
            layer.bias = params[i]; i += 1
    f = net(x)
    lossval = loss_value(f, y, loss) / f.shape[1]  # per-replica batch mean
    grads = torch.autograd.grad(lossval.sum(), params)
    i = 0
    for layer in net.layers:
        layer.weight = saved[i]; i += 1
        if layer.bias is not None:
            layer.bias = saved[i]; i += 1
    return grads


@pytest.mark.parametrize("arch,act", [("mlp", "tanh"), ("mlp", "relu"), ("cnn", "tanh")])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_explicit_bp_equals_autograd(arch, act, loss):
    torch.manual_seed(0)
    shape = (1, 8, 8) if arch == "cnn" else (12,)
    net = build(arch, shape, 5, 16, preset("mup", "sgd", base_width=8), activation=act, K=3, seeds=[1, 2, 3],
                dtype=torch.float64)
    x = torch.randn(3, 7, *shape, dtype=torch.float64)  # per-replica inputs
    y = torch.randint(0, 5, (3, 7))
    grads, lossval = make_algo("bp", loss=loss).step(net, x, y)
    ref = _autograd_grads(net, x, y, loss)
    assert len(grads) == len(ref)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12), (g - r).abs().max()
    assert lossval.shape == (3,)


def test_autograd_oracle_can_fail():
    """Guard: a wrong backward (missing phi') is caught by the comparison above."""
    net = build("mlp", (6,), 4, 8, preset("sp"), dtype=torch.float64, seeds=[0])
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    grads, _ = make_algo("bp").step(net, x, y)
    net.linearize = lambda l, u, a=None: (lambda g: g)  # drop phi'
    wrong, _ = make_algo("bp").step(net, x, y)
    assert not torch.allclose(grads[0], wrong[0], rtol=1e-6)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_replicas_equal_separate_runs(arch, opt, synth):
    """K = 4 replicas (own seeds, own learning rates, own data order) equal 4 separate runs."""
    data = synth
    if arch == "cnn":
        from mulocal.data import Dataset
        data = Dataset("img", synth.x_train[:256].reshape(256, 2, 4, 4), synth.y_train[:256],
                       synth.x_test[:64].reshape(64, 2, 4, 4), synth.y_test[:64], 10)
    lrs = {"sgd": [0.05, 0.1, 0.2, 0.4], "adam": [1e-3, 2e-3, 4e-3, 8e-3]}[opt]
    seeds = [3, 4, 5, 6]
    p = preset("mup", opt, base_width=8)
    cfg = dict(epochs=2, batch_size=32, optimizer=opt, momentum=0.0, progress=False, max_steps=6)

    def run(K, lr, sd):
        net = build(arch, data.input_shape, 10, 32, p, K=K, seeds=sd, dtype=torch.float64)
        res = Trainer(net, make_algo("bp"), data, TrainConfig(lr=lr, **cfg), seeds=sd).run()
        return net, res

    batched, res = run(4, lrs, seeds)
    for k in range(4):
        single, res1 = run(1, [lrs[k]], [seeds[k]])
        for p_b, p_s in zip(batched.params(), single.params()):
            assert torch.allclose(p_b[k], p_s[0], rtol=1e-6, atol=1e-9)
        assert res["replicas"][k]["test_loss"] == pytest.approx(res1["replicas"][0]["test_loss"], rel=1e-6)
    # and the replicas really differ from each other
    assert not torch.allclose(batched.params()[0][0], batched.params()[0][1])


def test_momentum_sgd_matches_torch():
    """Our per-layer SGD with momentum equals torch.optim.SGD with the resolved learning rates."""
    net = build("mlp", (6,), 4, 16, preset("mup", "sgd", base_width=4), dtype=torch.float64, seeds=[0])
    ref = [p.clone().requires_grad_() for p in net.params()]
    scales = [16 / 16 * 4, 4, 1, 4, 0.25, 1]  # m = 4: W1, b1 (c=-1), W2 (c=0), b2, W3 (c=1), b3 (0)
    torch_opt = torch.optim.SGD([{"params": [r], "lr": 0.1 * s} for r, s in zip(ref, scales)], momentum=0.9)
    opt = LayerwiseOptimizer.for_net(net, 0.1, "sgd", momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in net.params()]
        opt.step(grads)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        torch_opt.step()
    for p, r in zip(net.params(), ref):
        assert torch.allclose(p, r.detach(), rtol=1e-12)


def test_adam_matches_torch():
    net = build("mlp", (6,), 4, 16, preset("mup", "adam", base_width=4), dtype=torch.float64, seeds=[0])
    ref = [p.clone().requires_grad_() for p in net.params()]
    scales = [1, 1, 0.25, 1, 0.25, 1]  # Adam muP c = (0, 1, 1), biases c = 0
    torch_opt = torch.optim.Adam([{"params": [r], "lr": 0.01 * s} for r, s in zip(ref, scales)])
    opt = LayerwiseOptimizer.for_net(net, 0.01, "adam")
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in net.params()]
        opt.step(grads)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        torch_opt.step()
    for p, r in zip(net.params(), ref):
        assert torch.allclose(p, r.detach(), rtol=1e-10)


# ----------------------------------------------------------------------------- predictive coding
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("gbar", [-1.0, 0.0, 1.0])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_pc_fini_fpa_si_single_shot_is_gamma_L_times_bp(arch, gbar, loss):
    """F-ini + FPA + SI + T = 1 + kappa_l = 1/gamma_l: the PC update is gamma_L x the BP gradient."""
    torch.manual_seed(1)
    shape = (1, 8, 8) if arch == "cnn" else (12,)
    net = build(arch, shape, 5, 16, preset("mup", "sgd", gamma_bar_L=gbar, base_width=4), K=2, seeds=[1, 2],
                dtype=torch.float64)
    x, y = torch.randn(2, 7, *shape, dtype=torch.float64), torch.randint(0, 5, (2, 7))
    bp, _ = make_algo("bp", loss=loss).step(net, x, y)
    pc, _ = make_algo("pc", loss=loss, fpa=True, T=1, inference="sequential", init="forward").step(net, x, y)
    gamma_L = net.param.gamma_L(net.width)
    assert gamma_L == pytest.approx(4.0 ** -gbar)
    for p, b in zip(pc, bp):
        assert (p - gamma_L * b).abs().max() <= 1e-10 * (gamma_L * b).abs().max()


def test_pc_identity_needs_fpa_and_si():
    """The identity is specific: without FPA, or with parallel inference, the update differs from BP's."""
    net = build("mlp", (12,), 5, 16, preset("mup", "sgd", base_width=4), seeds=[1], dtype=torch.float64)
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    bp, _ = make_algo("bp").step(net, x, y)
    no_fpa, _ = make_algo("pc", fpa=False).step(net, x, y)
    parallel, _ = make_algo("pc", fpa=True, inference="parallel").step(net, x, y)
    assert not torch.allclose(no_fpa[2], bp[2], rtol=1e-3)  # hidden-to-hidden weights
    assert parallel[0].abs().max() == 0  # one parallel step leaves the input layer's error at 0
    cos = torch.nn.functional.cosine_similarity(no_fpa[2].flatten(), bp[2].flatten(), 0)
    assert 0.2 < cos < 0.95


def test_pc_incremental_updates_weights_during_inference(synth):
    from mulocal.optim import LayerwiseOptimizer
    net = build("mlp", synth.input_shape, 10, 32, preset("mup", "sgd", base_width=32), seeds=[0],
                dtype=torch.float64)
    before = [p.clone() for p in net.params()]
    opt = LayerwiseOptimizer.for_net(net, 0.1)
    x, y = synth.x_train[:16], synth.y_train[:16]
    grads, _ = make_algo("pc", T=3, incremental=True).step(net, x, y, opt=opt)
    assert opt.t == 2 and not torch.equal(before[0], net.params()[0])  # T - 1 updates inside the step
    with pytest.raises(Exception, match="needs the optimizer"):
        make_algo("pc", T=3, incremental=True).step(net, x, y)
