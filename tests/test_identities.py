"""Exact identities: the explicit BP equals autograd; K replicas equal K separate runs."""
import math
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
    """K = 4 replicas (own seeds, own learning rates, own data order) equal 4 separate runs, to float64 rounding
    (other shapes, maybe other kernels): 6 steps of a depth-3 net whose longest sums have 32 terms (MLP: inputs,
    width, batch) or 32 x 4 x 4 = 512 (CNN: the first conv's weight gradient over batch and pixels); Adam's
    m / (sqrt(v) + eps) is O(1)-conditioned in g. A replica mix-up moves the weights by O(1)."""
    from tolerances import chain_rtol, rel_diff, train_ops
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
    rtol = chain_rtol(torch.float64, train_ops(6, 3, 512 if arch == "cnn" else 32))
    for k in range(4):
        single, res1 = run(1, [lrs[k]], [seeds[k]])
        for p_b, p_s in zip(batched.params(), single.params()):
            assert rel_diff(p_b[k], p_s[0]) <= rtol, (k, rel_diff(p_b[k], p_s[0]), rtol)
        assert res["replicas"][k]["test_loss"] == pytest.approx(res1["replicas"][0]["test_loss"], rel=rtol, abs=0)
    # and the replicas really differ from each other
    assert not torch.allclose(batched.params()[0][0], batched.params()[0][1])


@pytest.mark.parametrize("kind,lr,momentum,wd,steps,seed", [
    ("sgd", 0.1, 0.9, 0.0, 4, 0), ("adam", 0.01, 0.0, 0.0, 4, 0),
    # L2 weight decay added to the gradient, as torch.optim's weight_decay (kills optim-weight-decay-sign)
    ("sgd", 0.1, 0.0, 0.05, 3, 1), ("sgd", 0.1, 0.9, 0.05, 3, 1), ("adam", 0.01, 0.0, 0.1, 3, 1)])
def test_optimizer_matches_torch(kind, lr, momentum, wd, steps, seed):
    """Our per-layer SGD (momentum, weight decay) / Adam equals torch.optim's with the resolved learning rates."""
    net = build("mlp", (6,), 4, 16, preset("mup", kind, base_width=4), dtype=torch.float64, seeds=[0])
    ref = [p.clone().requires_grad_() for p in net.params()]
    # m = 4; W1, b1, W2, b2, W3, b3. SGD muP: c = (-1, 0, 1), biases (-1, 0); Adam: c = (0, 1, 1), biases 0
    scales = [4, 4, 1, 4, 0.25, 1] if kind == "sgd" else [1, 1, 0.25, 1, 0.25, 1]
    # Adam's eps under muP: microsoft/mup's readout rule, eps * m on W3 (not its bias), eps elsewhere
    eps = [1e-8 * e for e in ([1, 1, 1, 1, 4, 1] if kind == "adam" else [1] * 6)]
    groups = [{"params": [r], "lr": lr * s, "eps": e} for r, s, e in zip(ref, scales, eps)]
    torch_opt = (torch.optim.SGD(groups, momentum=momentum, weight_decay=wd) if kind == "sgd"
                 else torch.optim.Adam(groups, weight_decay=wd))
    opt = LayerwiseOptimizer.for_net(net, lr, kind, momentum=momentum, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in net.params()]
        opt.step(grads)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        torch_opt.step()
    for p, r in zip(net.params(), ref):
        assert torch.allclose(p, r.detach(), rtol=1e-10, atol=1e-12 if wd else 0.0)


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


# ----------------------------------------------------------------------------- target propagation
def _well_conditioned_linear_net(n=6, K=2):
    net = build("mlp", (n,), n, n, preset("sp", base_width=n), activation="linear", bias=False, K=K,
                seeds=list(range(K)), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for layer in net.layers:
        layer.weight.copy_(torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(layer.weight.shape, generator=gen,
                                                                                dtype=torch.float64) / n ** 0.5)
    return net


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_dtp_with_exact_inverse_equals_gnt(loss):
    """Invertible linear network, exact-inverse feedback: DTP targets = GNT targets with lambda -> 0."""
    net = _well_conditioned_linear_net()
    x, y = torch.randn(2, 5, 6, dtype=torch.float64), torch.randint(0, 6, (2, 5))
    dtp = make_algo("dtp", loss=loss, feedback="inverse", beta=0.7)
    gnt = make_algo("gnt", loss=loss, damping=1e-13, beta=0.7)
    g_dtp, _ = dtp.step(net, x, y)
    g_gnt, _ = gnt.step(net, x, y)
    for t1, t2 in zip(dtp._last[2][1:], gnt._last[2][1:]):
        assert torch.allclose(t1, t2, rtol=0, atol=1e-8 * t2.abs().max())
    for a, b in zip(g_dtp, g_gnt):
        assert torch.allclose(a, b, rtol=0, atol=1e-8 * b.abs().max())
    # and it is not trivially so: with damping the targets move
    damped = make_algo("gnt", loss=loss, damping=1.0, beta=0.7)
    damped.step(net, x, y)
    assert not torch.allclose(damped._last[2][1], gnt._last[2][1], atol=1e-4)


def test_gnt_jacobians_equal_autograd():
    from mulocal.algos.gnt import GNT
    net = build("mlp", (5,), 3, 7, preset("mup", base_width=4), K=2, seeds=[0, 1], dtype=torch.float64)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    us, acts = net.forward(x)
    J = GNT.jacobians(net, us, acts)

    def f_from_h1(h1):  # (K, B, n1) -> f
        u2 = net.layers[1].forward(h1)
        return net.layers[2].forward(net.post(2, u2))
    jac = torch.autograd.functional.jacobian(f_from_h1, acts[1])  # (K, B, C, K, B, n)
    for k in range(2):
        for b in range(4):
            assert torch.allclose(J[1][k, b], jac[k, b, :, k, b, :], rtol=1e-10)


def test_ridge_feedback_equals_lstsq():
    """Ridge feedback Q_l = H_{l-1} (H_l^T H_l + mu I)^{-1} H_l^T equals numpy's least squares on the
    augmented system [H_l^T; sqrt(mu) I] Q^T = [H_{l-1}^T; 0]."""
    np = pytest.importorskip("numpy")
    net = build("mlp", (9,), 4, 12, preset("mup", "sgd", algo="dtp", base_width=4), seeds=[0], dtype=torch.float64)
    x = torch.randn(20, 9, dtype=torch.float64)
    us, acts = net.forward(x)
    algo = make_algo("dtp", feedback="ridge", ridge=0.05)
    algo.setup(net)
    for l in (2, 3):
        Q = algo._linear_map(net, l, acts, us[-1])
        H = (us[-1] if l == 3 else acts[l])[0].numpy()
        Hp = acts[l - 1][0].numpy()
        mu = 0.05 * H.shape[1]
        A = np.vstack([H, np.sqrt(mu) * np.eye(H.shape[1])])
        Bm = np.vstack([Hp, np.zeros((H.shape[1], Hp.shape[1]))])
        Qt, *_ = np.linalg.lstsq(A, Bm, rcond=None)  # (n_l, n_{l-1}) = Q^T
        r = torch.randn(1, 7, H.shape[1], dtype=torch.float64)
        assert torch.allclose(Q(r), torch.from_numpy(r[0].numpy() @ Qt)[None], rtol=1e-9, atol=1e-11)


def test_trainable_linear_feedback_converges_to_least_squares():
    """Noise-free linear feedback trained on one batch converges to the least-squares map (with
    intercept) from h_l to h_{l-1}: plain gradient descent on a convex quadratic at a stable step converges linearly
    to its minimiser, here to float64 rounding (Adam at a constant LR does not settle exactly: it hovered at 1e-7 to
    3e-3 from the solution depending on the data draw)."""
    import numpy as np
    net = build("mlp", (6,), 3, 5, preset("sp", base_width=5), seeds=[0], dtype=torch.float64)
    x = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    algo = make_algo("dtp", feedback="linear", sigma=0.0, fb_iters=1, fb_lr=0.5, fb_optimizer="sgd")
    us, acts = net.forward(x)
    algo.setup(net)
    algo.fb_opt.base_lr[:] = 1.0
    algo.fb_opt._set_lrs()
    for _ in range(8000):
        algo.train_feedback(net, acts, us[-1])
    H = us[-1][0].numpy()  # g_3 maps the output f back to h_2
    A = np.hstack([H, np.ones((64, 1))])
    sol, *_ = np.linalg.lstsq(A, acts[2][0].numpy(), rcond=None)
    V, c = algo.fb[3].weight[0].numpy() * algo.fb[3].mult, algo.fb[3].bias[0].numpy()
    assert np.allclose(V, sol[:-1].T, rtol=0, atol=1e-10) and np.allclose(c, sol[-1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("fb_loss", ["rec", "drl", "ldrl"])
def test_reconstruction_error_falls_during_feedback_training(fb_loss):
    net = build("mlp", (10,), 4, 32, preset("mup", "sgd", algo="dtp", base_width=32), seeds=[0])
    x = torch.randn(128, 10)
    algo = make_algo("dtp", feedback="trainable", fb_loss=fb_loss, sigma=0.1, fb_lr=3e-3, fb_optimizer="adam")
    us, acts = net.forward(x)
    algo.setup(net)

    def rec_error():  # noise-free reconstruction of h_1 from h_2 through g_2
        g, _ = algo._g(2, acts[2], net)
        return (g - acts[1]).pow(2).mean().item() if fb_loss == "rec" else None

    first = algo.train_feedback(net, acts, us[-1])
    for _ in range(300):
        last = algo.train_feedback(net, acts, us[-1])
    key = "fb_loss_2" if fb_loss == "ldrl" else "rec_err_2"  # L-DRL aligns J_g with J_f^T, not an inverse
    assert last[key].item() < first[key].item() - 0.3 * abs(first[key].item()), (first, last)
    if fb_loss == "rec":
        assert rec_error() < 0.5


def test_dtp_replicas_equal_separate_runs(synth):
    """Trainable feedback: per-replica feedback init and noise, so K replicas = K runs, to float64 rounding (other
    shapes): 5 steps, each a forward pass, 2 feedback-training passes and the target pass, through 3 layers whose
    longest sums have 32 terms (inputs, batch)."""
    from tolerances import chain_rtol, rel_diff, train_ops
    rtol = chain_rtol(torch.float64, train_ops(5 * (2 + 2), 3, 32))
    p = preset("mup", "sgd", algo="dtp", base_width=8)
    cfg = dict(epochs=1, batch_size=32, optimizer="sgd", progress=False, max_steps=5)

    def run(lrs, seeds):
        net = build("mlp", synth.input_shape, 10, 16, p, K=len(seeds), seeds=seeds, dtype=torch.float64)
        Trainer(net, make_algo("dtp", fb_iters=2), synth, TrainConfig(lr=lrs, **cfg), seeds=seeds).run()
        return net

    both = run([0.1, 0.3], [5, 6])
    for k, (lr, s) in enumerate([(0.1, 5), (0.3, 6)]):
        one = run([lr], [s])
        for a, b in zip(both.params(), one.params()):
            assert rel_diff(a[k], b[0]) <= rtol, (k, rel_diff(a[k], b[0]), rtol)


def test_pc_random_init_replicas_equal_separate_runs():
    """Random value initialisation draws one stream per replica seed: batching does not change it (to float64
    rounding: one step, T = 3 inference moves and the weight gradient, each a pass through 3 layers of width 16)."""
    from tolerances import chain_rtol, rel_diff, train_ops
    rtol = chain_rtol(torch.float64, train_ops(3 + 1, 3, 16))
    p = preset("mup", "sgd", base_width=8)
    x, y = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 4, (6,))

    def grads(seeds):
        net = build("mlp", (10,), 4, 16, p, K=len(seeds), seeds=seeds, dtype=torch.float64)
        return make_algo("pc", init="random", T=3, inference="parallel", kappa=0.2).step(net, x, y)[0]
    both = grads([3, 4])
    for k, s in enumerate([3, 4]):
        for a, b in zip(both, grads([s])):
            assert rel_diff(a[k], b[0]) <= rtol, (k, rel_diff(a[k], b[0]), rtol)


def test_tp_feedback_follows_a_new_net_of_another_width():
    """One DTP instance used on several nets (as the coordinate check does) builds feedback per net."""
    algo = make_algo("dtp")
    x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    for width in (16, 32, 16, 64):
        net = build("mlp", (10,), 4, width, preset("mup", "sgd", algo="dtp", base_width=16), seeds=[0])
        grads, _ = algo.step(net, x, y)
        assert algo.fb[2].weight.shape[1:] == (width, width)
        del net


def test_ridge_feedback_marks_a_nonfinite_replica_diverged(synth):
    """A replica whose activities blow up makes its ridge system singular: it is recorded as diverged and
    the other replicas train on (no exception from the Cholesky factorisation)."""
    net = build("mlp", synth.input_shape, 10, 32, preset("mup", "sgd", algo="tp", base_width=32), K=2, seeds=[0, 1])
    with torch.no_grad():
        net.layers[0].weight[1] = float("nan")
    res = Trainer(net, make_algo("tp", feedback="ridge"), synth,
                  TrainConfig(epochs=1, lr=0.1, batch_size=64, progress=False), seeds=[0, 1]).run()
    assert [r["status"] for r in res["replicas"]] == ["done", "diverged"]


def test_tp_diagnostics_output_layer_update_is_beta_times_bp():
    """record=True: the output layer's local update is beta x the BP gradient (cosine exactly 1); hidden
    layers' cosines, target distances and reconstruction errors are reported per layer."""
    net = build("mlp", (10,), 4, 32, preset("mup", "sgd", algo="dtp", base_width=32), K=2, seeds=[0, 1],
                dtype=torch.float64)
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 4, (16,))
    algo = make_algo("dtp", record=True, beta=0.5)
    grads, _ = algo.step(net, x, y)
    bp, _ = make_algo("bp").step(net, x, y)
    assert torch.allclose(grads[-2], 0.5 * bp[-2], rtol=1e-10)
    assert torch.allclose(algo.stats["bp_cos_3"], torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert set(algo.stats) >= {"bp_cos_1", "bp_cos_2", "tdist_1", "tdist_2", "tdist_3", "rec_err_2", "rec_err_3"}
    assert (algo.stats["bp_cos_2"].abs() < 1 - 1e-6).all()  # hidden layers: a different direction


def test_feedback_pretraining_leaves_forward_weights_and_lowers_reconstruction(synth):
    net = build("mlp", synth.input_shape, 10, 32, preset("mup", "sgd", algo="dtp", base_width=32), seeds=[0])
    before = [p.clone() for p in net.params()]
    x = synth.x_train[:256]
    fresh = make_algo("dtp", fb_lr=0.05)
    fresh.setup(net)
    us, acts = net.forward(x)
    err0 = (fresh._g(2, acts[2], net)[0] - acts[1]).pow(2).mean()
    algo = make_algo("dtp", pretrain_epochs=2, fb_lr=0.05)
    Trainer(net, algo, synth, TrainConfig(epochs=0, batch_size=64, progress=False)).run()
    assert all(torch.equal(a, b) for a, b in zip(before, net.params()))
    err1 = (algo._g(2, acts[2], net)[0] - acts[1]).pow(2).mean()
    assert err1 < 0.7 * err0, (err0, err1)


def test_gnt_without_damping_marks_a_zeroed_replica_diverged(synth):
    """GNT with damping 0: a replica that diverges is zeroed and frozen, so its Gram matrix J J^T is exactly 0 at
    the next step; it stays recorded as diverged and the other replica trains on as it trains alone (no exception
    from the solve, and no device sync to check for one: the step can be captured as a CUDA graph).

    "As alone" to rounding, not bitwise: K = 2 and K = 1 are other shapes, which may take other kernels. Float64,
    so the bound is tight: 2 epochs x 16 steps of a depth-3 net whose longest sums have 64 terms (the batch), and
    GNT's solve with J J^T multiplies rounding by its condition: J = df/dh_l is 10 x 32, kappa(J J^T) ~
    ((sqrt 32 + sqrt 10) / (sqrt 32 - sqrt 10))^2 = 12.5 for a Gaussian-like J (Marchenko-Pastur), bounded here
    by 100 (phi' < 1 shrinks columns): 2 x 100 x 13056 u64 = 2.9e-10 relative; a replica mix-up moves it by O(1)."""
    from tolerances import chain_rtol, train_ops, assert_close_numbers

    def run(lrs, seeds):
        net = build("mlp", synth.input_shape, 10, 32, preset("mup", "sgd", base_width=32), K=len(seeds), seeds=seeds,
                    dtype=torch.float64)
        return Trainer(net, make_algo("gnt", damping=0.0), synth,
                       TrainConfig(epochs=2, lr=lrs, batch_size=64, progress=False, sync_every=1), seeds=seeds).run()
    res = run([0.1, 1e6], [0, 1])
    assert [r["status"] for r in res["replicas"]] == ["done", "diverged"]
    assert math.isfinite(res["replicas"][0]["train_loss"])
    alone = run([0.1], [0])["replicas"][0]["history"]
    steps = 2 * len(synth.x_train) // 64
    assert_close_numbers(res["replicas"][0]["history"], alone,
                         chain_rtol(torch.float64, train_ops(steps, 3, 64), cond=100.0), skip=("epoch_time", "replica"))
