"""Training loop: a floor on real data, divergence handling, checkpoints, metrics."""
import json

import pytest
import torch

from mulocal.algos import make_algo
from mulocal.errors import CheckpointError
from mulocal.nets import build
from mulocal.param import preset
from mulocal.train import Trainer, TrainConfig, load_checkpoint
from mulocal.config import DEFAULT_LR


def test_floor_bp_mup_fashion_mnist(fmnist):
    """BP, muP (SGD), width 256, one epoch with the documented default learning rate: >= 0.82."""
    net = build("mlp", fmnist.input_shape, 10, 256, preset("mup", "sgd"), seeds=[0])
    res = Trainer(net, make_algo("bp"), fmnist, TrainConfig(epochs=1, lr=DEFAULT_LR["sgd"], progress=False)).run()
    acc = res["replicas"][0]["test_accuracy"]
    assert acc >= 0.82, acc


def test_floor_pc_mup_fashion_mnist(fmnist):
    """PC under its muP (single-shot SI, no FPA, gbar_L = 0), width 512, 3 epochs: >= 0.85."""
    from mulocal.algos.pc import PC
    algo = PC()  # documented defaults on a plain MLP: T = 1, sequential, F-ini, no FPA, kappa = 1/gamma
    net = build("mlp", fmnist.input_shape, 10, 512, preset("mup", "sgd", gamma_bar_L=0.0), seeds=[0])
    res = Trainer(net, algo, fmnist, TrainConfig(epochs=3, lr=DEFAULT_LR["sgd"], progress=False)).run()
    assert (algo.steps, algo.mode, algo.init, algo.fpa, algo.guard) == (1, "sequential", "forward", False, False)
    acc = res["replicas"][0]["test_accuracy"]
    assert acc >= 0.85, acc


def test_floor_dtp_mup_fashion_mnist(fmnist):
    """DTP under its muP with trainable feedback, width 512, 3 epochs, documented defaults: >= 0.83."""
    from mulocal.algos.tp import DTP
    algo = DTP()  # defaults: trainable phi(V a + c) feedback, rec loss, sigma 0.1, beta 1, fb lr 0.01
    net = build("mlp", fmnist.input_shape, 10, 512, preset("mup", "sgd", algo="dtp"), seeds=[0])
    res = Trainer(net, algo, fmnist, TrainConfig(epochs=3, lr=DEFAULT_LR["sgd"], progress=False)).run()
    acc = res["replicas"][0]["test_accuracy"]
    assert acc >= 0.83, acc


def test_diverged_replica_is_recorded_and_others_go_on(synth, tmp_path):
    net = build("mlp", synth.input_shape, 10, 64, preset("sp"), K=3, seeds=[0, 1, 2])
    metrics = tmp_path / "m.jsonl"
    res = Trainer(net, make_algo("bp", loss="mse"), synth,
                  TrainConfig(epochs=2, lr=[0.05, 1e6, 0.1], batch_size=64, progress=False,
                              metrics_path=str(metrics))).run()
    status = [r["status"] for r in res["replicas"]]
    assert status == ["done", "diverged", "done"]
    assert res["replicas"][0]["test_accuracy"] > 0.2 and res["replicas"][2]["test_accuracy"] > 0.2
    assert res["replicas"][1]["test_accuracy"] is None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 6 and {r["replica"] for r in rows} == {0, 1, 2}
    assert all(r["status"] == "diverged" for r in rows if r["replica"] == 1)
    assert all(torch.isfinite(p).all() for p in net.params())


def test_training_reduces_loss(synth):
    net = build("mlp", synth.input_shape, 10, 64, preset("mup", "sgd", base_width=32), seeds=[0])
    tr = Trainer(net, make_algo("bp"), synth, TrainConfig(epochs=3, lr=0.2, batch_size=64, progress=False))
    res = tr.run()
    hist = [h for h in res["replicas"][0]["history"]]
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert hist[-1]["test_accuracy"] > 0.5


def test_checkpoint_resume_equals_uninterrupted(synth, tmp_path):
    cfg = dict(lr=0.1, batch_size=64, progress=False)
    p = preset("mup", "sgd", base_width=32)
    full = build("mlp", synth.input_shape, 10, 64, p, seeds=[4], dtype=torch.float64)
    Trainer(full, make_algo("bp"), synth, TrainConfig(epochs=2, **cfg), seeds=[4]).run()
    ck = str(tmp_path / "ck.pt")
    part = build("mlp", synth.input_shape, 10, 64, p, seeds=[4], dtype=torch.float64)
    Trainer(part, make_algo("bp"), synth, TrainConfig(epochs=1, checkpoint_path=ck, **cfg), seeds=[4]).run()
    resumed = build("mlp", synth.input_shape, 10, 64, p, seeds=[99], dtype=torch.float64)
    res = Trainer(resumed, make_algo("bp"), synth, TrainConfig(epochs=2, checkpoint_path=ck, resume=True, **cfg),
                  seeds=[4]).run()
    assert res["epochs"] == 2
    for a, b in zip(full.params(), resumed.params()):
        assert torch.allclose(a, b, rtol=1e-12)


def test_checkpoint_refuses_mismatched_shapes(synth, tmp_path):
    net = build("mlp", synth.input_shape, 10, 64, preset("sp"), seeds=[0])
    ck = str(tmp_path / "ck.pt")
    Trainer(net, make_algo("bp"), synth, TrainConfig(epochs=1, max_steps=1, checkpoint_path=ck, progress=False)).run()
    other = build("mlp", synth.input_shape, 10, 128, preset("sp"), seeds=[0])
    with pytest.raises(CheckpointError, match="width"):
        load_checkpoint(ck, other)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(tmp_path / "junk.pt"), net)
    # a checkpoint of another learning rule on the same net is refused by name, before any state is read
    cfg = TrainConfig(epochs=1, max_steps=1, checkpoint_path=ck, progress=False, resume=True)
    with pytest.raises(CheckpointError, match="learning rule 'bp', this run uses 'pc'"):
        Trainer(net, make_algo("pc"), synth, cfg)


def test_cnn_learns_fashion_mnist(fmnist):
    """The CNN (conv-pool-conv-pool-linear, K = 2 replicas) learns real images in a short run."""
    from mulocal.data import Dataset
    d = Dataset("fmnist-small", fmnist.x_train[:3000], fmnist.y_train[:3000], fmnist.x_test[:1000],
                fmnist.y_test[:1000], 10)
    net = build("cnn", d.input_shape, 10, 16, preset("mup", "adam", base_width=16), K=2, seeds=[0, 1])
    res = Trainer(net, make_algo("bp"), d, TrainConfig(epochs=1, lr=3e-3, optimizer="adam", batch_size=32,
                                                        progress=False), seeds=[0, 1]).run()
    for r in res["replicas"]:
        assert r["test_accuracy"] > 0.6, r["test_accuracy"]


@pytest.mark.parametrize("algo,feedback", [("dtp", "trainable"), ("dtp", "ridge"), ("tp", "trainable")])
def test_cnn_target_propagation_learns(fmnist, algo, feedback):
    """TP/DTP on the CNN (conv feedback: upsampling + convolution; or batch ridge feedback)."""
    from mulocal.data import Dataset
    d = Dataset("fmnist-small", fmnist.x_train[:3000], fmnist.y_train[:3000], fmnist.x_test[:1000],
                fmnist.y_test[:1000], 10)
    net = build("cnn", d.input_shape, 10, 16, preset("mup", "sgd", algo=algo, base_width=16), seeds=[0])
    res = Trainer(net, make_algo(algo, feedback=feedback), d,
                  TrainConfig(epochs=1, lr=0.1, batch_size=32, progress=False)).run()
    assert res["replicas"][0]["test_accuracy"] > 0.55


def test_a_finite_but_exploding_loss_is_diverged_with_its_step(synth):
    """LR 1e6 with tanh gives a huge but finite loss: diverged (loss > 10 x its first-step loss), with the step."""
    net = build("mlp", synth.input_shape, 10, 64, preset("sp"), K=2, seeds=[0, 1])
    tr = Trainer(net, make_algo("bp"), synth, TrainConfig(epochs=1, lr=[0.05, 1e6], batch_size=64, progress=False))
    res = tr.run()
    assert [r["status"] for r in res["replicas"]] == ["done", "diverged"]
    event = [h for h in res["replicas"][1]["history"] if h.get("event") == "diverged"]
    assert len(event) == 1 and 0 <= event[0]["step"] < 16
    # the bound is configurable: off, the same replica is only "done" with a loss far above its start
    net = build("mlp", synth.input_shape, 10, 64, preset("sp"), K=2, seeds=[0, 1])
    res = Trainer(net, make_algo("bp"), synth, TrainConfig(epochs=1, lr=[0.05, 1e6], batch_size=64, progress=False,
                                                           diverge_factor=None)).run()
    assert res["replicas"][1]["status"] == "done" and res["replicas"][1]["train_loss"] > 100


def test_optimizer_comes_from_the_parameterization(synth):
    """preset("mup", "adam") trains with Adam at Adam's default LR; naming SGD for it is an error."""
    from mulocal.errors import ConfigError
    net = build("mlp", synth.input_shape, 10, 32, preset("mup", "adam", base_width=16), seeds=[0])
    tr = Trainer(net, make_algo("bp"), synth, TrainConfig(epochs=1, batch_size=64, progress=False))
    assert tr.opt.kind == "adam" and tr.lrs.tolist() == [DEFAULT_LR["adam"]] == [1e-3]
    with pytest.raises(ConfigError, match="exponents for adam"):
        Trainer(net, make_algo("bp"), synth, TrainConfig(optimizer="sgd", progress=False))
    sp = build("mlp", synth.input_shape, 10, 32, preset("sp"), seeds=[0])
    assert Trainer(sp, make_algo("bp"), synth, TrainConfig(progress=False)).opt.kind == "sgd"
    assert Trainer(sp, make_algo("bp"), synth, TrainConfig(progress=False)).lrs.tolist() == [0.1]


@pytest.mark.parametrize("arch,optimizer", [("mlp", "sgd"), ("mlp", "adam"), ("cnn", "sgd")])
def test_readout_only_baseline_trains_the_output_layer_alone(arch, optimizer):
    """The feature-learning baseline: hidden weights stay bitwise at their initialisation, and the output
    layer's gradient is the loss gradient in W_L alone (autograd of the written-out loss, hidden features
    fixed)."""
    from mulocal.data import load_dataset
    data = load_dataset("synthetic", train_subset=256, test_subset=64, seed=0)
    g = torch.Generator().manual_seed(3)
    shape = (1, 8, 8) if arch == "cnn" else data.input_shape
    net = build(arch, shape, 10, 4 if arch == "cnn" else 32, preset("mup", optimizer), K=2, seeds=[0, 1],
                dtype=torch.float64)
    init = [p.clone() for p in net.params()]
    algo = make_algo("bp", readout_only=True)
    x = torch.randn(16, *shape, generator=g, dtype=torch.float64) if arch == "cnn" else data.x_train[:16].double()
    y = torch.randint(0, 10, (16,), generator=g) if arch == "cnn" else data.y_train[:16]
    grads, loss = algo.step(net, x, y)
    us, acts = net.forward(x)
    last = net.layers[-1]
    W = last.weight.detach().clone().requires_grad_(True)
    b = last.bias.detach().clone().requires_grad_(True)
    saved = last.weight, last.bias
    last.weight, last.bias = W, b
    with torch.enable_grad():
        f = last.forward(acts[-1].detach())
        total = torch.nn.functional.cross_entropy(f.flatten(0, 1), y.repeat(2), reduction="sum") / len(y)
        gW, gb = torch.autograd.grad(total, (W, b))
    last.weight, last.bias = saved
    assert all(gr.abs().max() == 0 for gr in grads[:-2])
    torch.testing.assert_close(grads[-2], gW, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[-1], gb, rtol=1e-10, atol=1e-12)
    if arch == "mlp":
        net = build(arch, shape, 10, 32, preset("mup", optimizer), K=2, seeds=[0, 1])
        init = [p.clone() for p in net.params()]
        Trainer(net, algo, data, TrainConfig(epochs=1, lr=0.1 if optimizer == "sgd" else 1e-3, optimizer=optimizer,
                                             progress=False)).run()
        assert all(torch.equal(p, q) for p, q in zip(net.params()[:-2], init[:-2]))
        assert not torch.equal(net.params()[-2], init[-2])


def _no_clock(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "epoch_time"} for h in history]


def test_divergence_acted_on_every_n_steps_keeps_every_number():
    """sync_every only changes when diverged replicas are acted on: the recorded step of divergence, the
    survivors' weights and losses are bitwise those of acting at every step, and the diverged replica ends
    zeroed and frozen."""
    from mulocal.data import load_dataset
    data = load_dataset("synthetic", train_subset=1024, test_subset=128, seed=0)
    runs = []
    for every in (1, 7, 1000):
        net = build("mlp", data.input_shape, data.n_classes, 32, preset("mup", "sgd"), K=3, seeds=[0, 1, 2])
        tr = Trainer(net, make_algo("bp"), data, TrainConfig(epochs=2, batch_size=32, lr=[0.1, 300.0, 0.2],
                                                             sync_every=every, progress=False), seeds=[0, 1, 2])
        res = tr.run()
        runs.append((res, [p.clone() for p in net.params()]))
    (ref, ref_w), others = runs[0], runs[1:]
    assert [r["status"] for r in ref["replicas"]] == ["done", "diverged", "done"]
    event = [h for h in ref["replicas"][1]["history"] if h.get("event") == "diverged"]
    assert len(event) == 1 and event[0]["epoch"] == 0
    for res, w in others:
        assert [r["status"] for r in res["replicas"]] == ["done", "diverged", "done"]
        assert [h for h in res["replicas"][1]["history"] if h.get("event")] == event
        for k in (0, 2):  # every recorded number the same (the wall-clock epoch_time aside)
            assert _no_clock(res["replicas"][k]["history"]) == _no_clock(ref["replicas"][k]["history"])
        assert all(torch.equal(p[[0, 2]], q[[0, 2]]) for p, q in zip(w, ref_w))
        assert all((p[1] == 0).all() for p in w)


@pytest.mark.parametrize("algo,opts", [("bp", {}), ("pc", {"T": 3, "inference": "parallel"}), ("dtp", {}),
                                       ("dtp", {"fb_loss": "ldrl"}), ("dtp", {"noise_rng": "host"}),
                                       ("dtp", {"feedback": "ridge"})])
def test_no_host_read_back_per_training_step(monkeypatch, algo, opts):
    """With sync_every = N the loop reads from the device once per N steps (plus the epoch's evaluation):
    every host read-back (.item, .tolist, .cpu, bool of a tensor) is counted."""
    from mulocal.data import load_dataset
    data = load_dataset("synthetic", train_subset=32 * 40, test_subset=64, seed=0)

    from oracles import host_reads

    def count(every):
        net = build("mlp", data.input_shape, data.n_classes, 32, preset("mup", "sgd", algo=algo), K=2, seeds=[0, 1])
        return host_reads(monkeypatch, lambda: Trainer(net, make_algo(algo, **opts), data, TrainConfig(
            epochs=1, batch_size=32, sync_every=every, progress=False)).run())
    few, many = count(1000), count(1)
    assert many >= 40 and few <= 30, (few, many)


def test_a_finished_run_trains_on_when_its_epochs_are_raised():
    """Raising cfg.epochs of a finished Trainer and calling run() again = one run of that many epochs (bitwise):
    done replicas run again, a diverged one stays frozen and recorded once."""
    from mulocal.config import assemble

    def trainer(epochs):
        return assemble(dict(algo="bp", dataset="synthetic", width=16, epochs=epochs, batch_size=32,
                             train_subset=200, test_subset=50), [0.1, 1e4], [0, 1]).trainer()
    whole = trainer(3).run()
    tr = trainer(1)
    tr.run()
    for _ in range(2):
        tr.cfg.epochs += 1
        res = tr.run()
    assert [_no_clock(r["history"]) for r in res["replicas"]] == [_no_clock(r["history"]) for r in whole["replicas"]]
    assert [r["status"] for r in res["replicas"]] == ["done", "diverged"]
    assert sum(h.get("event") == "diverged" for h in res["replicas"][1]["history"]) == 1


def test_tf32_is_a_dtype_of_its_own_and_sets_the_gpu_precision_during_the_run(monkeypatch):
    """dtype="tf32": float32 tensors, and inside Trainer.run the GPU's float32 products and convolutions in
    TensorFloat-32 (strict IEEE float32 for dtype float32, cuDNN's TF32 default included); the settings come back
    afterwards. On the CPU the numbers are float32's, bitwise. A tf32 cell is another cell (its own hash)."""
    import torch

    from mulocal.algos.bp import BP
    from mulocal.config import assemble, config_hash, default_cell
    seen = []
    step = BP.step

    def spy(self, net, x, y, opt=None):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                     net.params()[0].dtype))
        return step(self, net, x, y, opt)
    monkeypatch.setattr(BP, "step", spy)
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    res = {}
    for dtype in ("float32", "tf32"):
        seen.clear()
        cell = dict(algo="bp", dataset="synthetic", width=16, epochs=1, batch_size=32, train_subset=96,
                    test_subset=32, dtype=dtype)
        res[dtype] = assemble(cell, [0.1], [0]).trainer().run()
        want = "tf32" if dtype == "tf32" else "ieee"
        assert set(seen) == {(want, want, torch.float32)}
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
    assert [_no_clock(r["history"]) for r in res["tf32"]["replicas"]] == \
        [_no_clock(r["history"]) for r in res["float32"]["replicas"]]
    assert config_hash(default_cell(dtype="tf32")) != config_hash(default_cell(dtype="float32"))
