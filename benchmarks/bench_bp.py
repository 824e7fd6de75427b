"""Benchmark: backpropagation training speed of mulocal's batched-replica MLP on the CPU or ``--device``.

What it measures (3-layer tanh MLP 784 -> M -> M -> 10, batch 128, BP + SGD under muP
(``preset("mup", "sgd")``), FashionMNIST training set):

1. mulocal BP time per epoch (seconds, extrapolated from ``--steps`` timed steps after
   ``--warmup`` untimed ones) and training samples/s, for each width in ``--widths``.
2. K = ``--replicas`` (default 8) replicas trained in ONE batched model vs the same K models
   trained one after another as K = 1 runs (same seeds, learning rates and number of steps),
   at width ``--replica-width``: the time of each and the speed-up sequential / batched. As a
   sanity check it also reports the largest weight difference between the two (it should be
   at float32 rounding level: a batched replica equals its separate run).
3. For reference, a naive eager PyTorch loop (``nn.Sequential`` of ``nn.Linear`` + ``nn.Tanh``,
   ``torch.optim.SGD``, autograd, cross-entropy) at the same widths and batch size, and the
   ratio mulocal / naive (below 1: mulocal is faster).

Timings use ``time.perf_counter``; mulocal times are the ``epoch_time`` the ``Trainer`` records
(training steps only, not its end-of-epoch evaluation, which runs on a small test subset here).
Every measurement is repeated ``--repeats`` times and the fastest repeat is reported. The
number of torch threads is left at PyTorch's default and is printed.

If FashionMNIST cannot be loaded (``mulocal data fetch fashion-mnist`` or Debian's
``dataset-fashion-mnist`` provide it), or with ``--dataset synthetic``, random tensors of the
same shape (60000 x 1 x 28 x 28, 10 classes) are used instead and the output says so; the
timings do not depend on the pixel values.

Everything runs on ``--device`` (default cpu; ``cuda`` for a GPU: the data set, the nets, the naive loop);
a device that is not available here stops the script with one line on stderr (status 2).

Run (a default run takes well under 3 minutes on 2 CPU cores):

    python benchmarks/bench_bp.py
    python benchmarks/bench_bp.py --steps 50 --widths 256,512,1024
    python benchmarks/bench_bp.py --json          # one JSON object on stdout instead of the table
    python benchmarks/bench_bp.py --device cuda   # on the GPU
"""
from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

from _common import (BATCH, BUSY_HINT, SPREAD_WARN, add_data_args, add_device_arg, add_timing_args, best, emit,
                     environment, load_data, make_parser, parse_ints, per_epoch, print_header, resolve_device,
                     shuffled_steps, spread)
from mulocal.algos import make_algo
from mulocal.data import Dataset
from mulocal.nets import build
from mulocal.param import preset
from mulocal.train import Trainer, TrainConfig

N_EVAL = 256  # test samples kept for the Trainer's end-of-epoch evaluation (not timed)


# ------------------------------------------------------------------------------------- mulocal
def run_mulocal(data: Dataset, width: int, K: int, seeds: list[int], lrs: list[float], steps: int,
                warmup: int, device: str = "cpu") -> tuple[float, object, list[str]]:
    """Build a K-replica muP MLP, warm up, then time ``steps`` BP + SGD steps.

    Returns (seconds for the timed steps, the net, replica statuses).
    """
    net = build("mlp", data.input_shape, data.n_classes, width, preset("mup", "sgd"), K=K, seeds=seeds,
                device=device)
    algo = make_algo("bp")

    def train(n: int) -> tuple[float, list[str]]:
        cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=lrs, optimizer="sgd", progress=False, max_steps=n)
        res = Trainer(net, algo, data, cfg, seeds=seeds).run()
        rows = [h for h in res["replicas"][0]["history"] if "event" not in h]
        return rows[-1]["epoch_time"], [r["status"] for r in res["replicas"]]

    if warmup:
        train(warmup)
    seconds, status = train(steps)
    return seconds, net, status


# --------------------------------------------------------------------------------------- naive
def run_naive(data: Dataset, width: int, lr: float, seed: int, steps: int, warmup: int,
              device: str = "cpu") -> float:
    """Seconds for ``steps`` steps of a plain eager-PyTorch MLP (autograd + torch.optim.SGD)."""
    torch.manual_seed(seed)
    in_dim = math.prod(data.input_shape)
    model = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, data.n_classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data.x_train.to(device), data.y_train.to(device)

    def step(idx):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        loss.item()
    train = shuffled_steps(step, len(x), seed, device)
    if warmup:
        train(warmup)
    return train(steps)


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--widths", default="256,1024", help="comma-separated widths M (default 256,1024)")
    add_timing_args(p, steps=150, warmup=5)
    p.add_argument("--replicas", type=int, default=8, help="K for the batched vs sequential comparison (default 8)")
    p.add_argument("--replica-width", type=int, default=256, help="width of the K-replica comparison (default 256)")
    p.add_argument("--lr", type=float, default=0.05, help="base SGD learning rate (default 0.05)")
    add_device_arg(p)
    add_data_args(p)
    args = p.parse_args(argv)
    args.device = resolve_device(args.device, "bench_bp")
    widths = parse_ints(args.widths, "--widths")
    for key in ("steps", "repeats", "replicas", "replica_width"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or not math.isfinite(args.lr) or args.lr < 0:
        p.error("--warmup must be >= 0 and --lr finite and >= 0")

    t_start = time.perf_counter()
    data, data_desc, note = load_data(args, n_eval=N_EVAL)
    n_train = len(data.x_train)
    steps_per_epoch = math.ceil(n_train / BATCH)
    steps = min(args.steps, steps_per_epoch)  # the Trainer never runs more than one epoch's steps
    warmup = min(args.warmup, steps_per_epoch)
    if steps != args.steps and not args.json:
        print(f"note: --steps capped at one epoch ({steps_per_epoch} steps)", file=sys.stderr)

    # 1 + 3: one model per width, mulocal vs naive
    width_rows = []
    for w in widths:
        (t_mu, _, status), mu_times = best(
            lambda: run_mulocal(data, w, 1, [0], [args.lr], steps, warmup, args.device), args.repeats)
        t_nv, nv_times = best(lambda: run_naive(data, w, args.lr, 0, steps, warmup, args.device), args.repeats)
        width_rows.append(dict(
            width=w,
            mulocal=dict(seconds=t_mu, epoch_s=per_epoch(t_mu, steps, steps_per_epoch), samples_per_s=steps * BATCH / t_mu,
                         all_seconds=mu_times, status=status[0]),
            naive=dict(seconds=t_nv, epoch_s=per_epoch(t_nv, steps, steps_per_epoch), samples_per_s=steps * BATCH / t_nv,
                       all_seconds=nv_times),
            ratio_mulocal_over_naive=t_mu / t_nv,
        ))

    # 2: K replicas batched vs K sequential K = 1 runs
    K, wr = args.replicas, args.replica_width
    seeds = list(range(K))
    lrs = [args.lr * 2.0 ** ((k - (K - 1) / 2) / 2) for k in range(K)]  # a small lr sweep around --lr

    def sequential():
        total, nets, status = 0.0, [], []
        for k in range(K):
            t, net_k, st = run_mulocal(data, wr, 1, [seeds[k]], [lrs[k]], steps, warmup, args.device)
            total += t
            nets.append(net_k)
            status += st
        return total, nets, status

    (t_b, net_b, status_b), b_times = best(lambda: run_mulocal(data, wr, K, seeds, lrs, steps, warmup, args.device),
                                           args.repeats)
    (t_s, nets_s, status_s), s_times = best(sequential, args.repeats)
    max_diff = 0.0
    for k, net_k in enumerate(nets_s):
        for pb, ps in zip(net_b.params(), net_k.params()):
            max_diff = max(max_diff, (pb[k] - ps[0]).abs().max().item())
    replicas = dict(
        K=K, width=wr, lrs=lrs, seeds=seeds,
        batched=dict(seconds=t_b, epoch_s=per_epoch(t_b, steps, steps_per_epoch),
                     replica_samples_per_s=K * steps * BATCH / t_b, all_seconds=b_times, status=status_b),
        sequential=dict(seconds=t_s, epoch_s=per_epoch(t_s, steps, steps_per_epoch),
                        replica_samples_per_s=K * steps * BATCH / t_s, all_seconds=s_times, status=status_s),
        speedup_sequential_over_batched=t_s / t_b,
        max_abs_weight_diff=max_diff,
    )

    result = dict(
        benchmark="bench_bp",
        model="mlp depth 3 tanh, BP + SGD, muP (mup-sgd); naive: nn.Sequential + torch.optim.SGD (SP init)",
        dataset=data_desc, dataset_note=note, n_train=n_train, batch_size=BATCH, steps=steps, warmup=warmup,
        steps_per_epoch=steps_per_epoch, repeats=args.repeats, lr=args.lr,
        env=environment(args.device),
        widths=width_rows, replicas=replicas, total_wall_s=time.perf_counter() - t_start,
    )
    emit(result, args.json, print_table)
    return 0


def print_table(r: dict) -> None:
    print_header(f"mulocal BP benchmark: 784 -> M -> M -> 10 tanh MLP, batch {r['batch_size']}, SGD, muP", r)
    print(f"timed steps {r['steps']} after {r['warmup']} warm-up steps, best of {r['repeats']}; "
          f"epoch = {r['steps_per_epoch']} steps (extrapolated)")
    print()
    print("1+3. one model per width: mulocal (batched-replica code, K=1) vs naive eager torch (autograd)")
    hdr = (f"{'width':>6} | {'mulocal s/epoch':>15} {'samples/s':>10} | {'naive s/epoch':>13} {'samples/s':>10} | "
           f"{'mulocal/naive':>13}")
    print(hdr)
    print("-" * len(hdr))
    for row in r["widths"]:
        mu, nv = row["mulocal"], row["naive"]
        print(f"{row['width']:>6} | {mu['epoch_s']:>15.2f} {mu['samples_per_s']:>10.0f} | {nv['epoch_s']:>13.2f} "
              f"{nv['samples_per_s']:>10.0f} | {row['ratio_mulocal_over_naive']:>13.2f}")
    print()
    rep = r["replicas"]
    print(f"2. K = {rep['K']} replicas at width {rep['width']} ({r['steps']} steps each, lrs "
          f"{rep['lrs'][0]:.3g}..{rep['lrs'][-1]:.3g})")
    hdr = f"{'mode':<28} | {'seconds':>8} {'s/epoch':>8} {'replica-samples/s':>18}"
    print(hdr)
    print("-" * len(hdr))
    for name, key in ((f"batched (one K={rep['K']} model)", "batched"), (f"sequential ({rep['K']} x K=1)", "sequential")):
        d = rep[key]
        print(f"{name:<28} | {d['seconds']:>8.2f} {d['epoch_s']:>8.2f} {d['replica_samples_per_s']:>18.0f}")
    print(f"speed-up sequential/batched: {rep['speedup_sequential_over_batched']:.2f}x   "
          f"(max |W_batched - W_sequential| = {rep['max_abs_weight_diff']:.2e})")
    diverged = sum(s == "diverged" for s in rep["batched"]["status"])
    if diverged:
        print(f"note: {diverged} of the batched replicas diverged (still computed, zeroed and frozen)")
    spreads = [spread(t) for row in r["widths"] for t in (row["mulocal"]["all_seconds"], row["naive"]["all_seconds"])]
    spreads += [spread(rep[k]["all_seconds"]) for k in ("batched", "sequential")]
    if max(spreads) > SPREAD_WARN:
        print(f"warning: repeats of one measurement differed by up to {max(spreads):.1f}x; {BUSY_HINT}")
    print(f"\ntotal wall time {r['total_wall_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
