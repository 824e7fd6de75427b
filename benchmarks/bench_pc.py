"""Benchmark: predictive-coding (PC) training speed of mulocal on the CPU, against BP and a naive PC.

What it measures (3-layer tanh MLP 784 -> M -> M -> 10, batch 128, plain SGD, FashionMNIST
training set; mulocal runs use muP, ``preset("mup", "sgd")``, and the learning rule
``PC(T, inference="sequential", fpa=False)`` with forward value initialisation):

1. PC cost relative to BP on the same model (width ``--widths``, default 1024) for T in
   ``--Ts`` (default 1, 5, 20): seconds per epoch of each, the measured ratio PC / BP, and
   next to it the FLOP-model ratio (2 + 2T) / 3. The model counts matrix products per layer
   and batch: BP does 3 (forward, backward, weight gradient); PC does the forward pass, 2 per
   inference step (a W^T product for the error from above and a W product for the new
   prediction) and the weight gradient, 2 + 2T in all. A second, shape-aware column counts
   the multiply-adds of the actual layer shapes: BP needs no backward product through the
   input layer, and PC's inference only touches layers 2..L (the input x is clamped, so the
   first-layer prediction never changes), so that count is lower than (2 + 2T) / 3.
2. The PCX comparison configuration: PC MLP of width 512, T = 5, batch 128, FashionMNIST,
   seconds per epoch extrapolated from the timed steps to 60000 / 128 = 469 steps. It is
   printed next to two REFERENCE numbers that are quoted, not measured by this script:
   5.8 s/epoch for PCX (JAX, jit) and 6.5 s/epoch for a naive eager-torch loop, both measured
   elsewhere on the same 2-core machine class.
3. In the same run, a naive eager-torch PC of that configuration written in this file
   (``nn.Linear`` layers; value nodes are tensors with ``requires_grad``; T inference steps of
   SGD with step size 1 = 1/gamma on the values, using ``torch.autograd.grad`` of the energy;
   then the weight update from autograd of the energy and ``torch.optim.SGD``), its seconds
   per epoch and the ratio mulocal / naive (below 1: mulocal is faster). Autograd of the
   energy moves all value nodes from one snapshot, i.e. parallel inference, so mulocal with
   ``inference="parallel"`` is timed as well, and a one-batch check confirms that the naive
   code and mulocal's parallel PC give the same weight gradients (same weights, SP, gamma = 1).

Timings use ``time.perf_counter``; mulocal times are the ``epoch_time`` the ``Trainer``
records (training steps only, not its end-of-epoch evaluation, which runs on a small test
subset here). The naive loop is timed the same way (one shuffle, batch indexing, the update,
reading each step's loss back). Every measurement runs ``--warmup`` untimed steps first and is
repeated ``--repeats`` times; repeats are interleaved (every configuration once, then again)
so a burst of load from another process hits all of them alike, and the fastest repeat is
reported. The number of torch threads is left at PyTorch's default and is printed.

If FashionMNIST cannot be loaded (``mulocal data fetch fashion-mnist`` provides it), or with
``--dataset synthetic``, random tensors of the same shape (60000 x 1 x 28 x 28, 10 classes)
are used instead and the output says so; the timings do not depend on the pixel values.

Run (a default run takes about 2 minutes on 2 CPU cores):

    python benchmarks/bench_pc.py
    python benchmarks/bench_pc.py --steps 20 --repeats 2     # quick check
    python benchmarks/bench_pc.py --widths 512,1024 --Ts 1,5,20
    python benchmarks/bench_pc.py --json                     # one JSON object on stdout instead of the table
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import (BATCH, BUSY_HINT, SPREAD_WARN, add_data_args, add_timing_args, emit, environment, interleaved,
                     load_data, make_parser, parse_ints, print_header)
from mulocal.algos.bp import BP
from mulocal.algos.pc import PC
from mulocal.data import Dataset
from mulocal.nets import build
from mulocal.param import preset
from mulocal.train import Trainer, TrainConfig

DEPTH = 3
N_EVAL = 256  # test samples kept for the Trainer's end-of-epoch evaluation (not timed)
PCX_WIDTH, PCX_T = 512, 5
# Reference numbers for the PCX configuration, quoted (measured elsewhere on the same 2-core machine class)
REFERENCE = (("PCX (JAX, jit)", 5.8), ("naive eager-torch loop", 6.5))


# ------------------------------------------------------------------------------------- mulocal
def time_mulocal(data: Dataset, width: int, make_rule, lr: float, steps: int, warmup: int) -> tuple[float, str]:
    """(seconds for ``steps`` training steps after ``warmup`` untimed ones, replica status)."""
    net = build("mlp", data.input_shape, data.n_classes, width, preset("mup", "sgd"), depth=DEPTH, K=1, seeds=[0])
    rule = make_rule()

    def train(n: int) -> tuple[float, str]:
        cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=lr, optimizer="sgd", progress=False, max_steps=n)
        res = Trainer(net, rule, data, cfg, seeds=[0]).run()
        rows = [h for h in res["replicas"][0]["history"] if "event" not in h]
        return rows[-1]["epoch_time"], res["replicas"][0]["status"]

    if warmup:
        train(warmup)
    return train(steps)


# --------------------------------------------------------------------------------------- naive
class NaivePC:
    """Predictive coding the straightforward eager-PyTorch way: autograd on the energy.

    Value nodes v_1..v_{L-1} are the hidden pre-activations, initialised by a feed-forward pass;
    with mu_l = W_l tanh(v_{l-1}) (v_0 = x, not squashed) and f = W_L tanh(v_{L-1}) the energy is

        E = sum_{l<L} 1/2 ||v_l - mu_l||^2 + CE(f, y)        (summed over the batch, gamma_l = 1)

    Inference: T steps v <- v - 1 * dE/dv (step size kappa = 1/gamma = 1; summing over the batch
    keeps each sample's step independent of B). Learning: autograd of E / B with respect to the
    weights at the final values, then ``torch.optim.SGD``.
    """

    def __init__(self, in_dim: int, width: int, n_classes: int, T: int, lr: float, seed: int = 0):
        torch.manual_seed(seed)
        dims = [in_dim] + [width] * (DEPTH - 1) + [n_classes]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(DEPTH))
        self.T = T
        self.opt = torch.optim.SGD(self.layers.parameters(), lr=lr)

    def energy(self, x: torch.Tensor, values: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        a, E = x, 0.0
        for layer, v in zip(self.layers[:-1], values):
            E = E + 0.5 * (v - layer(a)).pow(2).sum()
            a = torch.tanh(v)
        return E + F.cross_entropy(self.layers[-1](a), y, reduction="sum")

    def compute_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inference, then leave dE/dW in the parameters' ``.grad``; returns the feed-forward batch loss."""
        x = x.flatten(1)
        with torch.no_grad():  # forward initialisation of the value nodes
            a, values = x, []
            for layer in self.layers[:-1]:
                values.append(layer(a))
                a = torch.tanh(values[-1])
            ff_loss = F.cross_entropy(self.layers[-1](a), y)
        values = [v.requires_grad_(True) for v in values]
        for _ in range(self.T):
            grads = torch.autograd.grad(self.energy(x, values, y), values)
            with torch.no_grad():
                for v, g in zip(values, grads):
                    v.sub_(g)
        self.opt.zero_grad(set_to_none=True)
        (self.energy(x, [v.detach() for v in values], y) / x.shape[0]).backward()
        return ff_loss

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.compute_grads(x, y)
        self.opt.step()
        return loss


def time_naive(data: Dataset, width: int, T: int, lr: float, steps: int, warmup: int, seed: int = 0) -> float:
    """Seconds for ``steps`` steps of :class:`NaivePC` (after ``warmup`` untimed ones)."""
    model = NaivePC(math.prod(data.input_shape), width, data.n_classes, T, lr, seed)
    x, y = data.x_train, data.y_train
    gen = torch.Generator().manual_seed(seed)

    def train(n: int) -> float:
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)  # as the Trainer: one shuffle per epoch, inside the timing
        for i in range(n):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            model.step(x[idx], y[idx]).item()  # the Trainer also reads every step's loss back
        return time.perf_counter() - t0

    if warmup:
        train(warmup)
    return train(steps)


def check_naive(data: Dataset, width: int, T: int) -> dict:
    """Same weights (SP, gamma = 1): naive autograd PC vs mulocal's parallel PC on one batch."""
    net = build("mlp", data.input_shape, data.n_classes, width, preset("sp", "sgd"), depth=DEPTH, K=1, seeds=[0])
    naive = NaivePC(math.prod(data.input_shape), width, data.n_classes, T, lr=0.0)
    with torch.no_grad():
        for layer, lin in zip(net.layers, naive.layers):
            lin.weight.copy_(layer.weight[0])
            lin.bias.copy_(layer.bias[0])
    x, y = data.x_train[:BATCH], data.y_train[:BATCH]
    grads_mu, _ = PC(T=T, inference="parallel", fpa=False, kappa=1.0).step(net, x, y)  # the naive loop's step
    naive.compute_grads(x, y)
    grads_nv = [p.grad for lin in naive.layers for p in (lin.weight, lin.bias)]
    diff = max((gm[0] - gn).abs().max().item() for gm, gn in zip(grads_mu, grads_nv))
    scale = max(gm.abs().max().item() for gm in grads_mu)
    return dict(width=width, T=T, max_abs_grad_diff=diff, max_abs_grad=scale, rel=diff / scale if scale else diff)


# ------------------------------------------------------------------------------------- helpers
def matmul_counts(width: int, in_dim: int, out_dim: int, T: int) -> dict:
    """Multiply-adds per sample of the matrix products of one BP and one PC step (sequential, no FPA)."""
    sizes = [fi * fo for fi, fo in ((in_dim, width), (width, width), (width, out_dim))]
    S, s1 = sum(sizes), sizes[0]
    bp = S + (S - s1) + S  # forward, backward through layers 2..L, weight gradients
    pc = S + T * 2 * (S - s1) + S  # forward, T x (W^T and W products of layers 2..L), weight gradients
    return dict(bp=bp, pc=pc, ratio=pc / bp, model_ratio=(2 + 2 * T) / 3)


def summarize(results: list, steps: int, steps_per_epoch: int) -> dict:
    times = [r[0] if isinstance(r, tuple) else r for r in results]
    t = min(times)
    d = dict(seconds=t, epoch_s=t / steps * steps_per_epoch, ms_per_step=1000 * t / steps,
             samples_per_s=steps * BATCH / t, all_seconds=times, spread=max(times) / t)
    if isinstance(results[0], tuple):
        d["status"] = results[times.index(t)][1]
    return d


def label(key) -> str:
    """Readable name of a measurement key."""
    if isinstance(key, tuple):
        w, what = key
        return f"BP M={w}" if what == "bp" else f"PC T={what} M={w}"
    return {"pcx_seq": f"mulocal PC sequential M={PCX_WIDTH}", "pcx_par": f"mulocal PC parallel M={PCX_WIDTH}",
            "pcx_naive": f"naive PC M={PCX_WIDTH}"}[key]


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--widths", "--width", dest="widths", default="1024",
                   help="comma-separated width(s) M of the PC-vs-BP T table (default 1024)")
    p.add_argument("--Ts", default="1,5,20", help="comma-separated inference steps T of that table (default 1,5,20)")
    add_timing_args(p, steps=100, warmup=5)
    p.add_argument("--lr", type=float, default=0.1, help="base SGD learning rate (default 0.1)")
    add_data_args(p)
    args = p.parse_args(argv)
    widths, Ts = parse_ints(args.widths, "--widths"), parse_ints(args.Ts, "--Ts")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if not math.isfinite(args.lr) or args.lr < 0:
        p.error("--lr must be finite and >= 0")

    t_start = time.perf_counter()
    data, data_desc, note = load_data(args, n_eval=N_EVAL)
    n_train = len(data.x_train)
    steps_per_epoch = math.ceil(n_train / BATCH)  # 469 for FashionMNIST
    steps, warmup = min(args.steps, steps_per_epoch), min(args.warmup, steps_per_epoch)
    if steps != args.steps:
        print(f"note: --steps capped at one epoch ({steps_per_epoch} steps)", file=sys.stderr)
    lr = args.lr
    in_dim = math.prod(data.input_shape)

    # 1: PC vs BP at each width, for each T (all configurations interleaved per repeat)
    jobs = {}
    for w in widths:
        jobs[(w, "bp")] = lambda w=w: time_mulocal(data, w, BP, lr, steps, warmup)
        for T in Ts:
            jobs[(w, T)] = lambda w=w, T=T: time_mulocal(
                data, w, lambda: PC(T=T, inference="sequential", fpa=False), lr, steps, warmup)
    # 2 + 3: PCX configuration, mulocal (sequential and parallel inference) and the naive autograd PC
    jobs["pcx_seq"] = lambda: time_mulocal(
        data, PCX_WIDTH, lambda: PC(T=PCX_T, inference="sequential", fpa=False), lr, steps, warmup)
    jobs["pcx_par"] = lambda: time_mulocal(
        data, PCX_WIDTH, lambda: PC(T=PCX_T, inference="parallel", fpa=False), lr, steps, warmup)
    jobs["pcx_naive"] = lambda: time_naive(data, PCX_WIDTH, PCX_T, lr, steps, warmup)
    raw = interleaved(jobs, args.repeats)
    res = {k: summarize(v, steps, steps_per_epoch) for k, v in raw.items()}

    table = []
    for w in widths:
        bp = res[(w, "bp")]
        rows = []
        for T in Ts:
            pc = res[(w, T)]
            cnt = matmul_counts(w, in_dim, data.n_classes, T)
            rows.append(dict(T=T, pc=pc, ratio_measured=pc["seconds"] / bp["seconds"],
                             ratio_flop_model=cnt["model_ratio"], ratio_flop_shapes=cnt["ratio"]))
        table.append(dict(width=w, bp=bp, pc=rows))

    seq, par, nv = res["pcx_seq"], res["pcx_par"], res["pcx_naive"]
    pcx = dict(
        width=PCX_WIDTH, T=PCX_T, steps_per_epoch=steps_per_epoch,
        mulocal_sequential=seq, mulocal_parallel=par, naive=nv,
        ratio_mulocal_over_naive=seq["seconds"] / nv["seconds"],
        ratio_mulocal_parallel_over_naive=par["seconds"] / nv["seconds"],
        reference_quoted_not_measured=[dict(name=n, epoch_s=s) for n, s in REFERENCE],
        naive_check=check_naive(data, PCX_WIDTH, PCX_T),
    )

    result = dict(
        benchmark="bench_pc",
        model=f"mlp depth {DEPTH} tanh 784 -> M -> M -> 10, SGD; mulocal: muP (mup-sgd), PC(T, sequential, no FPA, "
              "forward init); naive: nn.Linear + autograd on the energy + torch.optim.SGD (SP init, gamma = 1)",
        dataset=data_desc, dataset_note=note, n_train=n_train, batch_size=BATCH, steps=steps, warmup=warmup,
        steps_per_epoch=steps_per_epoch, repeats=args.repeats, lr=lr,
        env=environment(),
        pc_vs_bp=table, pcx_config=pcx,
        repeat_spread={label(k): round(v["spread"], 3) for k, v in res.items()},
        max_repeat_spread=max(r["spread"] for r in res.values()),
        total_wall_s=time.perf_counter() - t_start,
    )
    emit(result, args.json, print_table)
    return 0


def print_table(r: dict) -> None:
    print_header(f"mulocal PC benchmark: 784 -> M -> M -> 10 tanh MLP, batch {r['batch_size']}, SGD (lr {r['lr']:g})", r)
    print(f"timed steps {r['steps']} after {r['warmup']} warm-up steps, best of {r['repeats']} interleaved repeats; "
          f"epoch = {r['steps_per_epoch']} steps (extrapolated)")
    for block in r["pc_vs_bp"]:
        print()
        bp = block["bp"]
        print(f"1. PC vs BP at width {block['width']} (muP, mulocal PC sequential inference, no FPA)")
        hdr = (f"{'rule':<8} | {'s/epoch':>8} {'ms/step':>8} {'samples/s':>10} | {'PC/BP measured':>14} "
               f"{'(2+2T)/3':>9} {'shape-aware':>11}")
        print(hdr)
        print("-" * len(hdr))
        print(f"{'BP':<8} | {bp['epoch_s']:>8.2f} {bp['ms_per_step']:>8.1f} {bp['samples_per_s']:>10.0f} | "
              f"{'1.00':>14} {'1.00':>9} {'1.00':>11}")
        for row in block["pc"]:
            pc = row["pc"]
            print(f"{'PC T=' + str(row['T']):<8} | {pc['epoch_s']:>8.2f} {pc['ms_per_step']:>8.1f} "
                  f"{pc['samples_per_s']:>10.0f} | {row['ratio_measured']:>14.2f} {row['ratio_flop_model']:>9.2f} "
                  f"{row['ratio_flop_shapes']:>11.2f}")
    print("   (2+2T)/3: 3 products per layer for BP, 2 + 2T for PC; shape-aware: multiply-adds of the actual "
          "layer shapes")
    print("   (no backward product through the input layer, PC inference touches layers 2..L only)")

    x = r["pcx_config"]
    print()
    print(f"2+3. PCX configuration: PC MLP width {x['width']}, T = {x['T']}, batch {r['batch_size']}, "
          f"epoch = {x['steps_per_epoch']} steps")
    hdr = f"{'implementation':<44} | {'s/epoch':>8} {'ms/step':>8} | source"
    print(hdr)
    print("-" * len(hdr))
    for name, d in (("mulocal PC (sequential inference)", x["mulocal_sequential"]),
                    ("mulocal PC (parallel inference)", x["mulocal_parallel"]),
                    ("naive eager-torch PC (autograd, this file)", x["naive"])):
        print(f"{name:<44} | {d['epoch_s']:>8.2f} {d['ms_per_step']:>8.1f} | measured here")
    for ref in x["reference_quoted_not_measured"]:
        print(f"{ref['name']:<44} | {ref['epoch_s']:>8.1f} {'':>8} | reference number quoted, NOT measured here")
    print(f"mulocal / naive (both measured here): {x['ratio_mulocal_over_naive']:.2f} (sequential), "
          f"{x['ratio_mulocal_parallel_over_naive']:.2f} (parallel; the naive code's inference is parallel)")
    c = x["naive_check"]
    print(f"check: naive vs mulocal parallel PC weight gradients on one batch (same SP weights): "
          f"max |diff| = {c['max_abs_grad_diff']:.2e} (largest gradient entry {c['max_abs_grad']:.2e})")

    statuses = [b["bp"].get("status") for b in r["pc_vs_bp"]] + [row["pc"].get("status") for b in r["pc_vs_bp"]
                                                                  for row in b["pc"]]
    statuses += [x[k].get("status") for k in ("mulocal_sequential", "mulocal_parallel")]
    if any(s == "diverged" for s in statuses):
        print("note: some mulocal runs diverged (their steps are still computed, so the timings stand)")
    if r["max_repeat_spread"] > SPREAD_WARN:
        worst = ", ".join(f"{k} {v:.1f}x" for k, v in r["repeat_spread"].items() if v > SPREAD_WARN)
        print(f"warning: repeats of one measurement differed by more than {SPREAD_WARN}x ({worst}); {BUSY_HINT}")
    print(f"\ntotal wall time {r['total_wall_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
