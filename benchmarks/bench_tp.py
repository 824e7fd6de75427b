"""Benchmark: cost of the target-propagation rules (TP, DTP) in mulocal on the CPU or ``--device``, against BP, GNT.

What it measures (3-layer tanh MLP 784 -> M -> M -> 10, M = ``--width`` (default 1024), batch
128, plain SGD with base learning rate ``--lr`` (default 0.1), K = 1, FashionMNIST training set),
side by side in one run, for five learning rules:

    BP           backpropagation,                   preset("mup", "sgd")
    TP           TP, trainable feedback, 1 iter,     preset("mup", "sgd", algo="tp")
    DTP          DTP, trainable feedback, 1 iter,    preset("mup", "sgd", algo="dtp")
    DTP-ridge    DTP, ridge feedback (no training),  preset("mup", "sgd", algo="dtp")
    GNT          Gauss-Newton targets,               preset("mup", "sgd", algo="gnt")

1. Seconds per epoch of each rule, extrapolated from ``--steps`` timed training steps (after
   ``--warmup`` untimed ones) to a full epoch of ceil(60000 / 128) = 469 steps, the training
   samples per second, and the ratio to BP (above 1: slower than BP).
2. For the target rules (TP, DTP, DTP-ridge, GNT), where the time goes, in seconds per epoch and
   as fractions of the step time. The phases are those ``TargetRule.step`` accumulates into
   ``algo.timings`` when ``algo.profile = True``:

       forward      the feed-forward pass and the output loss and its gradient
       feedback     feedback training (``fb_iters`` = 1 pass per layer for trainable feedback;
                    ridge feedback and GNT train nothing, so this is ~0 for them)
       targets      computing the targets t_l (ridge feedback: the per-layer Gram matrices and
                    their Cholesky solves; GNT: the Jacobians and the C x C solves)
       local grads  the layer-local gradients of 1/2 ||t_l - h_l||^2
       other        the rest of the step time: the SGD update (``opt.step``), batch indexing and
                    reading the loss back (step time minus the four phases above)

3. DTP's feedback-training noise: ms per DTP step (trainable feedback, 1 iteration) with K = 1 and
   K = 16 replicas (``--noise-k``; seeds 0..K-1, one learning rate), the noise drawn with
   ``noise_rng="host"`` (one CPU generator per replica, copied to the device every draw: the old way)
   and ``noise_rng="counter"`` (``streams.counter_normal``: all replicas at once on the device), side
   by side, and ms per replica-step. These steps do not read the loss back: the loss is summed on the
   device and read once at the end of the measurement, as the Trainer reads back every ``sync_every``
   steps, so on a GPU the timing is the device's throughput (the device is synchronised before the
   clock starts and by that read before it stops).

Everything runs on ``--device`` (default cpu; ``cuda`` for a GPU): the data set, the nets, the rules.

One training step of sections 1 and 2 is ``grads, loss = algo.step(net, x, y); opt.step(grads)`` with
``opt = LayerwiseOptimizer.for_net(net, lr, "sgd")`` and the loss read back with ``.item()``, as
the ``Trainer`` does; batches follow one seeded shuffle of the training set, drawn inside the
timing like the Trainer's. Timings use ``time.perf_counter``. Every repeat builds a fresh net
and rule from the same seed, so repeats do the same work; the warm-up steps also absorb the
one-time creation of TP's feedback layers. Repeats are interleaved (every rule once, then
again) so a burst of load from another process hits all rules alike, and the fastest repeat of
each rule is reported (its phase breakdown with it). A warning is printed when repeats of one
rule differ by more than 1.5x: another process is then probably competing for the CPU. The
number of torch threads is left at PyTorch's default and is printed, with the load average.

If FashionMNIST cannot be loaded (``mulocal data fetch fashion-mnist`` provides it), or with
``--dataset synthetic``, random tensors of the same shape (60000 x 1 x 28 x 28, 10 classes)
are used instead and the output says so; the timings do not depend on the pixel values.

Run (a default run is about 50 s of single-thread CPU work, i.e. roughly 0.5 to 1 minute on 2 idle
CPU cores; it takes longer when other processes use the CPU):

    python benchmarks/bench_tp.py
    python benchmarks/bench_tp.py --steps 10 --repeats 2      # quick check
    python benchmarks/bench_tp.py --width 512
    python benchmarks/bench_tp.py --json                      # one JSON object on stdout instead of the table
    python benchmarks/bench_tp.py --device cuda --noise-only  # section 3 only, on the GPU
"""
from __future__ import annotations

import math
import sys
import time

import torch

from _common import (BATCH, DEPTH, SPREAD_WARN, add_data_args, add_timing_args, emit, environment, interleaved,
                     load_average, load_data, make_parser, parse_ints, per_epoch, print_header, spread, sync)
from mulocal.algos import make_algo
from mulocal.algos.tp import NOISE_RNGS, TargetRule
from mulocal.data import Dataset
from mulocal.nets import build
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset

SEED = 0
FB_ITERS = 1
PHASES = ("forward", "feedback", "targets", "local_grads")  # the keys TargetRule.step writes into algo.timings

# (key, label, make_algo name, make_algo options, the ``algo`` of the muP preset)
RULES = (
    ("bp", "BP", "bp", {}, "bp"),
    ("tp", "TP (trainable fb)", "tp", dict(feedback="trainable", fb_iters=FB_ITERS), "tp"),
    ("dtp", "DTP (trainable fb)", "dtp", dict(feedback="trainable", fb_iters=FB_ITERS), "dtp"),
    ("dtp_ridge", "DTP (ridge fb)", "dtp", dict(feedback="ridge"), "dtp"),
    ("gnt", "GNT", "gnt", {}, "gnt"),
)


# -------------------------------------------------------------------------------------- timing
def time_rule(data: Dataset, spec: tuple, width: int, lr: float, steps: int, warmup: int,
              device: str = "cpu") -> dict:
    """Fresh net + rule + SGD; ``warmup`` untimed steps, then ``steps`` timed ones.

    Returns seconds for the timed steps, the per-phase seconds (target rules) and the last loss.
    """
    _, _, algo_name, options, preset_algo = spec
    net = build("mlp", data.input_shape, data.n_classes, width, preset("mup", "sgd", algo=preset_algo),
                depth=DEPTH, K=1, seeds=[SEED], device=device)
    algo = make_algo(algo_name, **options)
    profiled = isinstance(algo, TargetRule)  # TP, DTP, GNT: per-phase timings
    if profiled:
        algo.profile = True
    opt = LayerwiseOptimizer.for_net(net, lr, "sgd")
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    gen = torch.Generator().manual_seed(SEED)
    state = {"offset": 0, "perm": None}

    def train(n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        if state["perm"] is None:  # one shuffle, inside the timing as in the Trainer
            state["perm"] = torch.randperm(len(x_all), generator=gen).unsqueeze(0).to(device)  # (K = 1, n)
        loss_value = math.nan
        for _ in range(n):
            i = state["offset"]
            idx = state["perm"][:, i * BATCH:(i + 1) * BATCH]
            grads, loss = algo.step(net, x_all[idx], y_all[idx])
            opt.step(grads)
            loss_value = loss.double().sum().item()  # the Trainer also reads every step's loss back
            state["offset"] += 1
        return time.perf_counter() - t0, loss_value

    if warmup:
        train(warmup)
    if profiled:
        algo.timings = {}  # drop the warm-up's phase times
    seconds, last_loss = train(steps)
    phases = {k: float(algo.timings.get(k, 0.0)) for k in PHASES} if profiled else None
    return dict(seconds=seconds, phases=phases, last_loss=last_loss)


def time_noise(data: Dataset, K: int, noise_rng: str, width: int, lr: float, steps: int, warmup: int,
               device: str) -> dict:
    """DTP, trainable feedback, K replicas (seeds 0..K-1), its noise drawn with ``noise_rng``: ``warmup`` untimed
    steps, then ``steps`` timed ones, the loss summed on the device and read back once at the end."""
    net = build("mlp", data.input_shape, data.n_classes, width, preset("mup", "sgd", algo="dtp"), depth=DEPTH, K=K,
                seeds=list(range(K)), device=device)
    algo = make_algo("dtp", feedback="trainable", fb_iters=FB_ITERS, noise_rng=noise_rng)
    opt = LayerwiseOptimizer.for_net(net, lr, "sgd")
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    perm = torch.stack([torch.randperm(len(x_all), generator=torch.Generator().manual_seed(SEED + k))
                        for k in range(K)]).to(device)  # (K, n): each replica its own order, as in the Trainer
    state = {"offset": 0}

    def train(n: int) -> tuple[float, float]:
        sync(device)
        t0 = time.perf_counter()
        total = torch.zeros(K, dtype=torch.float64, device=device)
        for _ in range(n):
            i = state["offset"]
            idx = perm[:, i * BATCH:(i + 1) * BATCH]
            grads, loss = algo.step(net, x_all[idx], y_all[idx])
            opt.step(grads)
            total += loss.detach().double()
            state["offset"] += 1
        last = total.sum().item() / max(n * K, 1)  # the one read-back: waits for the device
        return time.perf_counter() - t0, last

    if warmup:
        train(warmup)
    seconds, mean_loss = train(steps)
    return dict(seconds=seconds, mean_loss=mean_loss)


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--width", type=int, default=1024, help="hidden width M (default 1024)")
    add_timing_args(p, steps=60, warmup=3)
    p.add_argument("--lr", type=float, default=0.1, help="base SGD learning rate (default 0.1)")
    p.add_argument("--device", default="cpu", help="torch device for data, nets and rules (default cpu; cuda)")
    p.add_argument("--noise-k", default="1,16", help="replica counts K of section 3 (default 1,16)")
    p.add_argument("--noise-only", action="store_true", help="run section 3 (DTP noise, host vs counter) only")
    add_data_args(p)
    args = p.parse_args(argv)
    noise_ks = parse_ints(args.noise_k, "--noise-k")
    try:
        from mulocal.config import check_device
        args.device = check_device(args.device)
    except Exception as err:  # ConfigError: unknown device or no CUDA
        p.error(str(err))
    for key in ("width", "steps", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    if args.warmup < 0 or not math.isfinite(args.lr) or args.lr < 0:
        p.error("--warmup must be >= 0 and --lr finite and >= 0")

    t_start = time.perf_counter()
    load_start = load_average()
    data, data_desc, note = load_data(args)
    n_train = len(data.x_train)
    steps_per_epoch = math.ceil(n_train / BATCH)
    # warm-up and timed steps share one shuffle of the training set, so together they fit in one epoch
    steps = min(args.steps, steps_per_epoch)
    warmup = min(args.warmup, steps_per_epoch - steps)
    if (steps, warmup) != (args.steps, args.warmup) and not args.json:
        print(f"note: steps capped to one epoch ({steps_per_epoch} steps): {warmup} warm-up + {steps} timed",
              file=sys.stderr)

    # interleaved: every rule once, then again
    rules = () if args.noise_only else RULES
    runs: dict[str, list[dict]] = interleaved(
        {spec[0]: lambda spec=spec: time_rule(data, spec, args.width, args.lr, steps, warmup, args.device)
         for spec in rules}, args.repeats)
    noise_runs: dict[tuple, list[dict]] = interleaved(
        {(K, rng): lambda K=K, rng=rng: time_noise(data, K, rng, args.width, args.lr, steps, warmup, args.device)
         for K in noise_ks for rng in NOISE_RNGS}, args.repeats)

    rows = []
    t_bp = min(r["seconds"] for r in runs["bp"]) if rules else math.nan
    for key, label, algo_name, options, preset_algo in rules:
        all_s = [r["seconds"] for r in runs[key]]
        fast = runs[key][min(range(len(all_s)), key=all_s.__getitem__)]
        t = fast["seconds"]
        row = dict(
            key=key, label=label, algo=algo_name, options=options, preset=f"mup-sgd (algo={preset_algo})",
            seconds=t, step_ms=1000 * t / steps, epoch_s=per_epoch(t, steps, steps_per_epoch),
            samples_per_s=steps * BATCH / t, ratio_to_bp=t / t_bp, all_seconds=all_s,
            spread=spread(all_s), last_loss=fast["last_loss"],
            finite=all(math.isfinite(r["last_loss"]) for r in runs[key]),
        )
        if fast["phases"] is not None:
            ph = dict(fast["phases"])
            ph["other"] = max(t - sum(ph.values()), 0.0)
            row["breakdown"] = {k: dict(seconds=v, epoch_s=per_epoch(v, steps, steps_per_epoch), fraction=v / t)
                                for k, v in ph.items()}
        rows.append(row)

    noise = []
    for (K, rng), results in noise_runs.items():
        all_s = [r["seconds"] for r in results]
        t = min(all_s)
        noise.append(dict(K=K, noise_rng=rng, seconds=t, step_ms=1000 * t / steps, replica_step_ms=1000 * t / steps / K,
                          all_seconds=all_s, spread=spread(all_s), mean_loss=results[0]["mean_loss"],
                          finite=all(math.isfinite(r["mean_loss"]) for r in results)))
    max_spread = max(r["spread"] for r in rows + noise)
    result = dict(
        benchmark="bench_tp",
        model=f"mlp 784 -> {args.width} -> {args.width} -> 10 tanh (depth {DEPTH}), K = 1, SGD, muP per rule",
        width=args.width, device=args.device, dataset=data_desc, dataset_note=note, n_train=n_train,
        batch_size=BATCH, lr=args.lr,
        fb_iters=FB_ITERS, steps=steps, warmup=warmup, steps_per_epoch=steps_per_epoch, repeats=args.repeats,
        env=environment(args.device, load_average_start=load_start, load_average_end=load_average()),
        rules=rows, noise=noise, max_repeat_spread=max_spread, repeats_disagree=max_spread > SPREAD_WARN,
        total_wall_s=time.perf_counter() - t_start,
    )
    emit(result, args.json, print_table)
    return 0


def print_table(r: dict) -> None:
    env = r["env"]
    M = r["width"]
    load = env["load_average_start"]
    print_header(f"mulocal target-propagation benchmark: 784 -> {M} -> {M} -> 10 tanh MLP, batch {r['batch_size']}, "
                 f"SGD lr {r['lr']:g}, muP per rule, K = 1", r,
                 f"; load average at start {load[0]:.2f}" if load else "")
    print(f"timed steps {r['steps']} after {r['warmup']} warm-up steps, best of {r['repeats']} (interleaved); "
          f"epoch = {r['steps_per_epoch']} steps (extrapolated); feedback iterations {r['fb_iters']}")
    if r["rules"]:
        print_rules(r)
    print_noise(r)
    bad = [row["label"] for row in r["rules"] if not row["finite"]]
    bad += [f"DTP K={row['K']} {row['noise_rng']}" for row in r["noise"] if not row["finite"]]
    if bad:
        print(f"note: the loss became non-finite for {', '.join(bad)} (the timing still counts the work done)")
    if r["repeats_disagree"]:
        worst = max(r["rules"] + r["noise"], key=lambda row: row["spread"])
        la = env["load_average_end"]
        print(f"warning: repeats of one measurement differed by up to {r['max_repeat_spread']:.1f}x "
              f"({worst.get('label') or 'DTP K=%d %s' % (worst['K'], worst['noise_rng'])}); another process is "
              f"probably using the CPU" + (f" (load average {la[0]:.2f} on {env['cpu_cores']} cores)" if la else "")
              + ", so compare with care or rerun")
    print(f"\ntotal wall time {r['total_wall_s']:.1f} s")


def print_noise(r: dict) -> None:
    print()
    print(f"3. DTP feedback-training noise (trainable feedback, {r['fb_iters']} iteration), ms per step on "
          f"{r['env']['device']}: noise_rng host vs counter")
    hdr = (f"{'K':>4} | {'host ms/step':>12} {'counter ms/step':>15} | {'host/counter':>12} | "
           f"{'ms/replica-step host':>20} {'counter':>8}")
    print(hdr)
    print("-" * len(hdr))
    by = {(row["K"], row["noise_rng"]): row for row in r["noise"]}
    for K in dict.fromkeys(row["K"] for row in r["noise"]):
        h, c = by[(K, "host")], by[(K, "counter")]
        print(f"{K:>4} | {h['step_ms']:>12.2f} {c['step_ms']:>15.2f} | {h['step_ms'] / c['step_ms']:>12.2f} | "
              f"{h['replica_step_ms']:>20.2f} {c['replica_step_ms']:>8.2f}")
    print("(host: per-replica CPU generators, copied to the device every draw; counter: streams.counter_normal on "
          "the device; loss read back once per measurement)")


def print_rules(r: dict) -> None:
    print()
    print("1. time per epoch")
    hdr = (f"{'rule':<20} | {'ms/step':>8} {'s/epoch':>8} {'samples/s':>10} | {'x BP':>6} | "
           f"{'spread':>6} {'last loss':>9}")
    print(hdr)
    print("-" * len(hdr))
    for row in r["rules"]:
        loss = f"{row['last_loss']:.3f}" if row["finite"] else "NON-FIN."
        print(f"{row['label']:<20} | {row['step_ms']:>8.1f} {row['epoch_s']:>8.2f} {row['samples_per_s']:>10.0f} | "
              f"{row['ratio_to_bp']:>6.2f} | {row['spread']:>5.2f}x {loss:>9}")
    print("(x BP: seconds per epoch / BP's; spread: slowest / fastest repeat; last loss: the last timed batch)")
    print()
    print("2. target rules: time per phase, s/epoch (fraction of the step)")
    cols = ("forward", "feedback", "targets", "local_grads", "other")
    names = ("forward", "feedback", "targets", "local grads", "other")
    hdr = f"{'rule':<20} | " + " ".join(f"{n:>14}" for n in names) + f" | {'total':>7}"
    print(hdr)
    print("-" * len(hdr))
    for row in r["rules"]:
        if "breakdown" not in row:
            continue
        b = row["breakdown"]
        cells = " ".join(f"{b[c]['epoch_s']:>7.2f} ({100 * b[c]['fraction']:>3.0f}%)" for c in cols)
        print(f"{row['label']:<20} | {cells} | {row['epoch_s']:>7.2f}")
    print("(feedback: feedback training; other: SGD update, batch indexing, loss read-back)")


if __name__ == "__main__":
    sys.exit(main())
