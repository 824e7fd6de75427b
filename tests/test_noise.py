"""Feedback-training noise of TP/DTP: the counter-based normal generator (streams.counter_normal) against an
independent numpy uint64 implementation and the normal law, replica k = a separate run, the host stream's old
numbers, checkpoint/resume, and which cell hashes the new default changes."""
import math

import numpy as np
import pytest
import torch

from mulocal.algos import make_algo
from mulocal.errors import ConfigError
from mulocal.nets import build
from mulocal.param import preset
from mulocal.streams import counter_bits, counter_keys, counter_normal, generators
from mulocal.train import Trainer, TrainConfig

# ----------------------------------------------------------------------------------- numpy oracle (uint64)
GAMMA, MUL1, MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def np_mix(z):
    """SplitMix64's finaliser in numpy uint64 (unsigned: shifts are logical, products wrap modulo 2^64)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MUL2)
    return z ^ (z >> np.uint64(31))


def np_bits(keys, counter: int, n: int) -> np.ndarray:
    k = np.asarray(keys, dtype=np.int64).view(np.uint64)
    base = np_mix(k ^ np_mix(np.uint64(counter)))
    with np.errstate(over="ignore"):
        return np_mix(base[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * np.uint64(GAMMA))


def np_normal(bits: np.ndarray, n: int) -> np.ndarray:
    """Box-Muller on each 64-bit word: elements 2j (cos) and 2j + 1 (sin) from word j; the first n per row."""
    u1 = ((bits >> np.uint64(32)) + np.uint64(1)).astype(np.float64) * 2.0 ** -32
    u2 = (bits & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0 ** -32
    r, theta = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
    out = np.empty((bits.shape[0], 2 * bits.shape[1]))
    out[:, 0::2], out[:, 1::2] = r * np.cos(theta), r * np.sin(theta)
    return out[:, :n]


def test_numpy_oracle_is_splitmix64():
    """Anchor for the oracle: SplitMix64 seeded with 1234567 gives the published first outputs."""
    with np.errstate(over="ignore"):
        out = np_mix(np.uint64(1234567) + np.arange(1, 6, dtype=np.uint64) * np.uint64(GAMMA))
    assert out.tolist() == [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                            16408922859458223821]


KEYS = [0, 1, -1, 2 ** 63 - 1, -2 ** 63, 0x0123456789ABCDEF, -0x0123456789ABCDEF]  # incl. sign bit set


@pytest.mark.parametrize("counter", [0, 1, 77, 2 ** 40 + 3])
def test_counter_normal_equals_numpy_oracle(counter):
    shape = (3, 5, 7)  # an odd number of elements: the last word's sine is dropped
    n = math.prod(shape)
    keys = torch.tensor(KEYS, dtype=torch.int64)
    want_bits = np_bits(KEYS, counter, (n + 1) // 2)
    assert np.array_equal(counter_bits(keys, counter, (n + 1) // 2).numpy().view(np.uint64), want_bits)
    want = np_normal(want_bits, n).reshape(len(KEYS), *shape)
    got = counter_normal(keys, counter, shape, torch.float64).numpy()
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= 1e-15 * np.maximum(1.0, np.abs(want))), np.abs(got - want).max()
    got32 = counter_normal(keys, counter, shape, torch.float32).numpy()
    assert got32.dtype == np.float32 and np.array_equal(got32, got.astype(np.float32))


def test_counter_normal_rows_depend_on_their_key_only():
    """Row k of a batched draw is the draw of key k alone, and a longer draw extends a shorter one: the bits
    exactly; the normals to float64 rounding, since another shape may put an element in a vector kernel's body
    or in its scalar tail, whose log, sqrt, cos / sin and product may round apart (a chain of 4)."""
    from tolerances import chain_rtol
    keys = counter_keys("feedback_noise_counter", [4, 7, 9])
    both = counter_normal(keys, 5, (6, 4), torch.float64)
    bits = counter_bits(keys, 5, 12)
    rtol = chain_rtol(torch.float64, 4)

    def same(a, b):  # element by element: each rounding is relative to its own result
        return bool(((a - b).abs() <= rtol * b.abs()).all())
    for k in range(3):
        assert torch.equal(bits[k], counter_bits(keys[k:k + 1], 5, 12)[0])
        assert same(both[k], counter_normal(keys[k:k + 1], 5, (6, 4), torch.float64)[0])
    # a longer draw extends a shorter one (element index, not shape, addresses a number)
    assert torch.equal(counter_bits(keys, 5, 13)[:, :12], bits)
    assert same(counter_normal(keys, 5, (24,), torch.float64)[:, :10], both.flatten(1)[:, :10])
    assert same(counter_normal(keys, 5, (25,), torch.float64)[:, :24], both.flatten(1))
    assert not same(both[1], both[0]) and not same(both.flatten(1)[:, 1:], both.flatten(1)[:, :-1])
    with pytest.raises(ValueError, match="counter"):
        counter_normal(keys, -1, (3,))


def test_counter_normal_moments_and_independence():
    """10^6 draws: mean, variance, 4th moment and the 5% tail within 6 standard errors of the normal law;
    no correlation between replicas, consecutive counters or neighbouring elements (|r| <= 6 / sqrt(n))."""
    K, n = 4, 250_000
    keys = counter_keys("feedback_noise_counter", range(K))
    x = counter_normal(keys, 0, (n,), torch.float64)
    z = x.flatten()
    N = z.numel()
    assert N == 10 ** 6
    assert abs(z.mean().item()) <= 6 / math.sqrt(N)
    assert abs(z.var().item() - 1) <= 6 * math.sqrt(2 / N)
    assert abs(z.pow(4).mean().item() - 3) <= 6 * math.sqrt(96 / N)  # Var(z^4) = 105 - 9
    tail, p = (z.abs() > 1.959964).double().mean().item(), 0.05
    assert abs(tail - p) <= 6 * math.sqrt(p * (1 - p) / N)
    assert z.abs().max().item() <= math.sqrt(64 * math.log(2)) + 1e-12  # u1 >= 2^-32

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return ((a * b).sum() / (a.norm() * b.norm())).item()
    bound = 6 / math.sqrt(n)
    for i in range(K):
        for j in range(i + 1, K):
            assert abs(corr(x[i], x[j])) <= bound, (i, j)
    nxt = counter_normal(keys, 1, (n,), torch.float64)
    for k in range(K):
        assert abs(corr(x[k], nxt[k])) <= bound, k
        assert abs(corr(x[k, :-1], x[k, 1:])) <= bound, k
    assert not torch.equal(x[0], nxt[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counter_normal_is_the_same_on_the_gpu():
    keys = counter_keys("feedback_noise_counter", [4, 7, 9])
    n = 100_003
    assert torch.equal(counter_bits(keys.cuda(), 3, n).cpu(), counter_bits(keys, 3, n))
    a = counter_normal(keys, 3, (n,), torch.float64, "cuda").cpu()
    b = counter_normal(keys, 3, (n,), torch.float64)
    assert torch.all((a - b).abs() <= 1e-15 * b.abs().clamp_min(1.0))


# ----------------------------------------------------------------------------------- the rule's noise
def _setup_dtp(noise_rng, seeds=(4, 7, 9)):
    net = build("mlp", (6,), 3, 8, preset("mup", "sgd", algo="dtp", base_width=8), K=len(seeds), seeds=list(seeds),
                dtype=torch.float64)
    algo = make_algo("dtp", noise_rng=noise_rng)
    algo.setup(net)
    return net, algo


def test_host_noise_is_the_feedback_noise_generator_stream():
    """noise_rng="host": replica k's noise is torch.randn from its own "feedback_noise" generator, draw after
    draw (the numbers from before noise_rng existed)."""
    seeds = (4, 7, 9)
    net, algo = _setup_dtp("host", seeds)
    gens = generators("feedback_noise", seeds)
    for shape, sigma in (((5, 8), 0.1), ((5, 3), 0.3), ((2, 8), 1.0)):
        like = torch.zeros(len(seeds), *shape, dtype=torch.float64)
        got = algo._noise(like, sigma)
        want = torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens]) * sigma
        assert torch.equal(got, want)
    assert algo.noise_counter == 0


def test_counter_noise_is_counter_normal_one_counter_per_draw():
    seeds = (4, 7, 9)
    net, algo = _setup_dtp("counter", seeds)
    keys = counter_keys("feedback_noise_counter", seeds)
    for c, (shape, sigma) in enumerate((((5, 8), 0.1), ((5, 3), 0.3), ((2, 8), 1.0))):
        assert algo.noise_counter == c
        got = algo._noise(torch.zeros(len(seeds), *shape, dtype=torch.float64), sigma)
        assert torch.equal(got, counter_normal(keys, c, shape, torch.float64) * sigma)
    assert algo.noise_counter == 3
    with pytest.raises(ConfigError, match="noise_rng"):
        make_algo("dtp", noise_rng="gpu")


@pytest.mark.parametrize("fb_loss", ["rec", "ldrl"])
def test_dtp_counter_noise_replicas_equal_separate_runs_bitwise(synth, fb_loss):
    """DTP with trainable feedback and counter noise: K = 3 replicas (seeds 4, 7, 9, own learning rates), two
    epochs, equal three single-seed runs (forward and feedback weights, losses) to float64 rounding, not to the
    bit as the name (kept for the mutant catalogue) says: other shapes may take other kernels. 2 x 16 steps, each
    a forward pass, 2 feedback-training passes and the target pass through 3 layers whose longest sums have 64
    terms (the batch); a noise stream keyed by the replica's position instead of its seed moves them by O(1)."""
    from tolerances import chain_rtol, rel_diff, train_ops
    rtol = chain_rtol(torch.float64, train_ops(2 * 16 * (2 + 2), 3, 64))
    p = preset("mup", "sgd", algo="dtp", base_width=8)
    cfg = dict(epochs=2, batch_size=64, optimizer="sgd", progress=False)
    seeds, lrs = [4, 7, 9], [0.05, 0.1, 0.2]

    def run(lr, sd):
        net = build("mlp", synth.input_shape, 10, 16, p, K=len(sd), seeds=sd, dtype=torch.float64)
        algo = make_algo("dtp", fb_loss=fb_loss, fb_iters=2, noise_rng="counter")
        res = Trainer(net, algo, synth, TrainConfig(lr=lr, **cfg), seeds=sd).run()
        assert algo.noise_rng == "counter" and algo.noise_counter > 0
        return net.params() + algo._fb_tensors(), res

    both, res = run(lrs, seeds)
    for k in range(3):
        one, res1 = run([lrs[k]], [seeds[k]])
        assert all(rel_diff(a[k], b[0]) <= rtol for a, b in zip(both, one)), (k, rtol)
        assert res["replicas"][k]["history"][-1]["train_loss"] == \
            pytest.approx(res1["replicas"][0]["history"][-1]["train_loss"], rel=rtol, abs=0)
    assert not torch.equal(both[-2][0], both[-2][1])


# ----------------------------------------------------------------------------------- checkpoints
def _resume_case(synth, tmp_path, trainer, noise_rng="counter", resume_rng=None):
    p = preset("mup", "sgd", algo="dtp", base_width=8)
    cfg = dict(lr=[0.1, 0.2], batch_size=64, progress=False)
    seeds = [4, 7]

    def net(sd=seeds):
        return build("mlp", synth.input_shape, 10, 16, p, K=2, seeds=sd, dtype=torch.float64)

    def algo(rng=noise_rng):
        return make_algo("dtp", fb_loss="ldrl", fb_optimizer="adam", fb_lr=1e-3, noise_rng=rng)
    full, full_algo = net(), algo()
    ref = trainer(full, full_algo, synth, TrainConfig(epochs=3, **cfg), seeds=seeds).run()
    ck = str(tmp_path / "ck.pt")
    trainer(net(), algo(), synth, TrainConfig(epochs=1, checkpoint_path=ck, **cfg), seeds=seeds).run()
    resumed, resumed_algo = net([99, 98]), algo(resume_rng or noise_rng)
    res = trainer(resumed, resumed_algo, synth, TrainConfig(epochs=3, checkpoint_path=ck, resume=True, **cfg),
                  seeds=seeds).run()
    assert res["epochs"] == 3 and resumed_algo.noise_counter == full_algo.noise_counter
    assert (full_algo.noise_counter > 0) == (noise_rng == "counter")

    def history(r):  # every number of every epoch but its wall time
        return [[{k: v for k, v in h.items() if k != "epoch_time"} for h in rep["history"]] for rep in r["replicas"]]
    same = all(torch.equal(a, b) for a, b in zip(full.params() + full_algo._fb_tensors(),
                                                  resumed.params() + resumed_algo._fb_tensors()))
    return same and history(res) == history(ref)


@pytest.mark.parametrize("noise_rng", ["counter", "host"])
def test_checkpoint_resume_with_counter_noise_is_bit_identical(synth, tmp_path, noise_rng):
    """Three epochs straight = one epoch, checkpoint, a fresh net and rule resumed for two more: the forward
    and feedback weights to the bit and the same losses, with the rule's state (feedback weights, their Adam
    moments, the noise counter or the host generators) in the Trainer's checkpoint."""
    assert _resume_case(synth, tmp_path, Trainer, noise_rng)


def test_auto_noise_resumes_with_the_generator_of_its_checkpoint(synth, tmp_path):
    """A run drawn with counter noise (a GPU run's default) resumed by a rule left at noise_rng="auto" on the CPU
    goes on drawing counter noise: it equals the uninterrupted counter run bit for bit."""
    assert _resume_case(synth, tmp_path, Trainer, "counter", resume_rng="auto")


def test_rule_state_refuses_another_noise_rng():
    from mulocal.errors import CheckpointError
    net, algo = _setup_dtp("counter")
    algo._noise(torch.zeros(3, 2, 8, dtype=torch.float64), 0.1)
    state = algo.state_dict()
    assert state["noise_counter"] == 1
    with pytest.raises(CheckpointError, match="noise_rng='counter'"):
        make_algo("dtp", noise_rng="host").load_state_dict(state, net)
    with pytest.raises(CheckpointError, match="no feedback state"):
        make_algo("dtp").load_state_dict({}, net)
    assert make_algo("dtp", feedback="ridge").state_dict() == {}


# ----------------------------------------------------------------------------------- cell hashes
@pytest.mark.parametrize("algo", ["tp", "dtp"])
def test_noise_rng_enters_the_hash_only_where_numbers_changed(algo):
    """The default noise (host: the numbers every stored cell was drawn with) leaves no trace in a cell's
    recorded options (old hashes kept); counter noise is recorded (new hashes)."""
    from mulocal.config import config_hash, default_cell, resolved_algo
    for opts in ({}, {"feedback": "linear"}, {"fb_loss": "ldrl", "sigma": [0.0, 0.1]}, {"feedback": "ridge"}):
        old = resolved_algo(default_cell(algo=algo, algo_options=opts))
        assert "noise_rng" not in old, opts
        r = resolved_algo(default_cell(algo=algo, algo_options={**opts, "noise_rng": "counter"}))
        assert r.get("noise_rng") == "counter"
        assert config_hash({"algo_resolved": r}) != config_hash({"algo_resolved": old})
    assert "noise_rng" not in resolved_algo(default_cell(algo="gnt"))


# ----------------------------------------------------------------------------------- the default: auto
def test_auto_noise_is_counter_on_a_gpu_and_host_elsewhere():
    """noise_rng="auto" (the default) resolves by the net's device: the counter stream on CUDA (drawn there for
    all replicas at once), the host generators on the CPU (every CPU result's numbers); named ones stay."""
    from types import SimpleNamespace

    from mulocal.algos.tp import resolve_noise_rng
    assert make_algo("dtp").noise_rng == "auto"
    for dev in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert resolve_noise_rng("auto", dev) == "counter"
    assert resolve_noise_rng("auto", "cpu") == "host"
    for rng in ("host", "counter"):
        assert resolve_noise_rng(rng, "cuda") == resolve_noise_rng(rng, "cpu") == rng
    # what decides whether the step can be compiled follows the device the net is on
    gpu_net = SimpleNamespace(device=torch.device("cuda"))
    assert make_algo("dtp").compile_blocker(gpu_net) is None
    assert "host" in make_algo("dtp", noise_rng="host").compile_blocker(gpu_net)
    net, algo = _setup_dtp("auto")
    assert algo.noise_source == "host" and "noise_rng='auto'" in algo.compile_blocker(net)


@pytest.mark.parametrize("opts,recorded", [({}, "host"), ({"noise_rng": "counter"}, "counter"),
                                           ({"feedback": "ridge"}, None)])
def test_auto_noise_on_the_cpu_is_the_host_stream_and_runs_record_their_generator(synth, opts, recorded):
    """DTP left at its default trains on the CPU exactly the numbers of noise_rng="host" (bitwise: the results
    stored before "auto" existed), and every history row names the generator the run drew with (none without
    trained feedback)."""
    p = preset("mup", "sgd", algo="dtp", base_width=8)

    def run(**o):
        net = build("mlp", synth.input_shape, 10, 16, p, K=2, seeds=[4, 7], dtype=torch.float64)
        res = Trainer(net, make_algo("dtp", **o), synth, TrainConfig(lr=[0.05, 0.1], epochs=2, batch_size=64,
                                                                      progress=False), seeds=[4, 7]).run()
        return net.params(), res
    params, res = run(**opts)
    rows = [h for r in res["replicas"] for h in r["history"]]
    assert len(rows) == 4 and all(h.get("noise_rng") == recorded for h in rows)
    if not opts:
        host, _ = run(noise_rng="host")
        assert all(torch.equal(a, b) for a, b in zip(params, host))
