"""Benchmark: PC training of PCX's VGG-5 (or VGG-7) in mulocal and in PCX side by side: accuracy, s/epoch, PC/BP.

What it runs (docs/conv.md has the measured tables): the net of ``mulocal.zoo`` (``--arch vgg5``: 4 convs 3 x 3 with
channels w, 2w, 4w, 4w, each -> activation -> 2 x 2 max pool, a linear readout; ``--width`` 128 = PCX's full
net, 32 = the quarter-channel net) trained by PC and by BP, with the same settings in both libraries:

    PC      T inference steps (``--T``), parallel (every value from one snapshot: PCX's autograd of the energy),
            heavy-ball SGD on the values (PCX: ``optax.sgd(h_lr, momentum)`` on the batch-mean energy, whose per-
            sample step is h_lr / B; mulocal: ``PC(inference="parallel", kappa=h_lr / B, momentum=...)``, the same
            move), forward initialisation, output energy = the loss (``--loss``: se = 1/2 ||f - y||^2, or ce)
    weights AdamW (``--lr``, ``--wd``; PCX: ``optax.adamw``; mulocal: ``optimizer="adam",
            weight_decay_mode="decoupled"``, equal to it under SP), batch ``--batch`` (128)
    BP      the same AdamW on the batch-mean loss (mulocal: ``BP``; PCX: a jit-compiled JAX/equinox BP of the same
            PCX layers, no value nodes: PCX has no BP of its own)

Defaults are PCX's VGG-5 CIFAR-10 PC configuration (``VGG5_PCN_SE.yaml`` of PCX's examples: T = 7, h_lr = 0.0235,
momentum 0.3, w_lr = 2.66e-4, wd = 6.66e-3, GELU, squared-error output energy, batch 128; constant LRs here, PCX's
script adds a warm-up/cosine schedule). mulocal runs SP (``--param sp``: PCX's parameterization; ``mup`` with
``--base-width`` 128 keeps PCX's numbers at the full width and scales them at others).

Where the value nodes sit differs between the libraries' conventions: mulocal's node of a unit is its output u_l
(the conv's output, before activation and pooling); PCX's scripts put the node after the pooling
(x = vode(pool(act(conv(x))))). The timed PCX model is PCX's own (``--pcx-placement post``); ``pre`` times PCX with
mulocal's placement. Before timing, an agreement check runs PCX with mulocal's placement from mulocal's initial
weights on ``--check-steps`` identical batches, both in float64: the feed-forward losses and the weights after them
must agree to 1e-4 relative (so both compute the same PC step with the same hyperparameters), else the script stops
(status 1).

Data: FashionMNIST (``--train-subset`` samples, seeded; the full test set unless ``--test-subset``), or CIFAR-10
(``--dataset cifar10``, where it is on disk: ``mulocal data fetch cifar10``). Each rule trains ``--epochs`` epochs
from scratch; s/epoch is the training loop of an epoch (mulocal: the Trainer's ``epoch_time``; PCX: the loop, the
summed loss read back once at its end), after an untimed warm-up (PCX: its jit compile, reported; mulocal: a 2-step
run on a throwaway net); test accuracy after each epoch is not timed. ``--threads`` (default 1) pins torch's and
XLA's CPU threads: on a machine whose cores other processes share, two threads per library cost up to 5x (measured,
docs/conv.md). The runs are sequential (mulocal PC, PCX PC, mulocal BP, PCX BP), so load changes between them
show in the load averages printed.

``--profile`` adds a ``torch.profiler`` table of one mulocal PC step (top operators by self CPU time).

``--compare-posts`` only times mulocal (no training, no PCX): one PC step and one BP step of the same net on one
batch, with the pooled posts written out (``mulocal.posts.FAST``, the default) and through ``torch.func.vjp`` (the
plain path), interleaved in one process, ``--repeats`` rounds after an untimed one (median per kind); it first checks
that every gradient and the loss are bitwise equal both ways (else status 1).

Run (about 4 minutes on 2 shared CPU cores with PCX, width 32, 4096 samples, 1 epoch):

    python benchmarks/bench_conv.py --pcx-python pcx-venv/bin/python
    python benchmarks/bench_conv.py --pcx-python pcx-venv/bin/python --epochs 2 --profile
    python benchmarks/bench_conv.py --compare-posts          # written-out pooled posts vs torch.func.vjp
    python benchmarks/bench_conv.py --width 128 --train-subset 0 --epochs 5 --device cuda --threads 0 \\
        --pcx-python PATH   # the full net on a GPU (PCX then needs a CUDA JAX)
    python benchmarks/bench_conv.py --dataset cifar10 ...          # where CIFAR-10 is on disk
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import PCXSide as _PCXChild
from _common import (BUSY_HINT, emit, environment, load_average, make_parser, print_header, resolve_device, sync)
from mulocal import posts, zoo
from mulocal.adapter import ModuleNet
from mulocal.algos.bp import BP
from mulocal.algos.pc import PC
from mulocal.data import Dataset, load_dataset
from mulocal.errors import ConfigError, DataError
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset
from mulocal.train import Trainer, TrainConfig

PCX_SIDE = Path(__file__).resolve().parent / "_pcx_conv_side.py"
AGREE_RTOL = 1e-4  # mulocal and PCX (mulocal's placement) must compute the same losses and weights to this
# PCX's VGG-5 CIFAR-10 PC configuration (examples/discriminative_experiments/VGG5/cifar10/VGG5_PCN_SE.yaml)
PCX_VGG5 = dict(T=7, h_lr=0.02348681827141059, h_momentum=0.30000000000000004, lr=0.0002657691155688603,
                wd=0.0066559627972820395, activation="gelu", loss="se", batch=128)
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
FULL_WIDTH = 128


# ----------------------------------------------------------------------------------------------- the nets
def make_net(args, data: Dataset, seed: int = 0, dtype=torch.float32) -> ModuleNet:
    """mulocal's net: ``zoo.<arch>`` at ``--width`` under SP (or muP with ``--base-width``), K = 1."""
    p = preset(args.param, "adam", base_width=args.base_width)  # SP: the same at every base width
    make = zoo.factory(args.arch, data.x_train.shape[1:], args.activation, data.n_classes)
    return ModuleNet(make, tuple(data.x_train.shape[1:]), args.width, p, K=1, seeds=[seed], dtype=dtype,
                     device=args.device)


def pc_rule(args) -> PC:
    """mulocal's PC with PCX's inference: parallel, kappa = h_lr / B (PCX differentiates the batch-mean energy),
    heavy-ball momentum, forward initialisation."""
    return PC(loss=mulocal_loss(args), T=args.T, inference="parallel", kappa=args.h_lr / args.batch,
              momentum=args.h_momentum, no_status=args.no_inference_status)


def mulocal_loss(args) -> str:
    return "mse" if args.loss == "se" else "ce"


def train_config(args, epochs: int, max_steps: int | None = None) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=args.batch, lr=args.lr, optimizer="adam", weight_decay=args.wd,
                       weight_decay_mode="decoupled", progress=False, max_steps=max_steps, eval_batch_size=1000)


def run_mulocal(args, data: Dataset, make_rule) -> dict:
    """Train ``--epochs`` epochs from scratch (after a 2-step warm-up on a throwaway net): per epoch the Trainer's
    training time, mean training loss and test accuracy."""
    Trainer(make_net(args, data, seed=1), make_rule(), data, train_config(args, 1, 2)).run()
    res = Trainer(make_net(args, data), make_rule(), data, train_config(args, args.epochs)).run()
    rows = [h for h in res["replicas"][0]["history"] if "event" not in h]
    steps = math.ceil(len(data.x_train) / args.batch)
    return dict(epochs=[dict(seconds=r["epoch_time"], steps=steps, loss_mean=r.get("train_loss"),
                             acc=r.get("test_accuracy")) for r in rows], status=res["replicas"][0]["status"])


# ------------------------------------------------------------------------------------------- the check
def mulocal_check(args, data: Dataset, steps: int):
    """(initial effective weights W0 b0 W1 b1 ... as numpy, feed-forward loss of each of ``steps`` PC + AdamW steps
    on the first batches in order, effective weights after them): mulocal's side of the agreement check, in float64
    (in float32 Adam turns the rounding of gradient entries that cancel to ~1e-9, near its eps, into O(lr) weight
    differences: measured 2.7e-4 relative after 3 steps, while the losses agreed to 2e-6)."""
    net = make_net(args, data, dtype=torch.float64)
    rule, opt = pc_rule(args), LayerwiseOptimizer.for_net(net, [args.lr], "adam", weight_decay=args.wd,
                                                          weight_decay_mode="decoupled")
    init = effective_weights(net)
    losses = []
    for s in range(steps):
        sl = slice(s * args.batch, (s + 1) * args.batch)
        grads, loss = rule.step(net, data.x_train[sl].to(args.device), data.y_train[sl].to(args.device))
        opt.step(grads)
        losses.append(float(loss[0]))
    return init, losses, effective_weights(net)


def effective_weights(net) -> list:
    """Each tensor of replica 0 times its width multiplier (what an unscaled library holds), numpy, in unit order."""
    out = []
    for layer in net.layers:
        for t, kind in zip(layer.tensors(), layer.kinds()):
            m = layer.rule.multiplier if kind == "weight" else 1.0
            out.append((t[0] * m).detach().cpu().numpy().copy())
    return out


def agreement(ours, theirs) -> dict:
    """Largest absolute difference of two flat sequences of numbers, and relative to the largest of ``theirs``."""
    a = torch.cat([torch.as_tensor(x, dtype=torch.float64).flatten() for x in ours])
    b = torch.cat([torch.as_tensor(x, dtype=torch.float64).flatten() for x in theirs])
    if a.shape != b.shape:
        raise ValueError(f"cannot compare {tuple(a.shape)} numbers with {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return dict(max_abs=math.inf, max_rel=math.inf)
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    return dict(max_abs=diff, max_rel=diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))


# ------------------------------------------------------------------------------------------- the PCX side
class PCXSide(_PCXChild):
    """The child process running ``_pcx_conv_side.py`` with PCX's Python (its protocol: that file's docstring)."""

    def __init__(self, python: str, npz: Path, out: Path, threads: int, x64: bool = False):
        env = dict(os.environ)
        if threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_ONE_THREAD).strip()
        super().__init__(python, PCX_SIDE, npz, out, ["--x64"] if x64 else [], env=env)


def start_pcx(args, data: Dataset, tmp: Path, init: list, x64: bool = False) -> PCXSide:
    """Write the .npz (architecture, settings, data, the check's batches and weights) and start PCX (``x64``:
    float64 throughout, for the check)."""
    import numpy as np
    blocks, (h, w) = zoo.vgg_plan(args.arch, data.x_train.shape[1:])
    rows = [(m * args.width, int(pool), pad) for m, pool, pad in blocks]
    S, B = args.check_steps, args.batch
    npz = tmp / "pcx_conv_input.npz"
    np.savez(npz, blocks=np.array(rows), in_shape=np.array(data.x_train.shape[1:]), fan=rows[-1][0] * h * w,
             n_classes=data.n_classes, act=args.activation, loss=args.loss, T=args.T, h_lr=args.h_lr,
             h_momentum=args.h_momentum, w_lr=args.lr, wd=args.wd, batch=B, seed=args.seed,
             x_train=data.x_train.float().numpy(), y_train=data.y_train.numpy(),
             x_test=data.x_test.float().numpy(), y_test=data.y_test.numpy(),
             x_check=data.x_train[:S * B].float().reshape(S, B, *data.x_train.shape[1:]).numpy(),
             y_check=data.y_train[:S * B].reshape(S, B).numpy(), **{f"w{i}": t for i, t in enumerate(init)})
    return PCXSide(args.pcx_python, npz, tmp / "pcx_conv_after_check.npz", args.threads, x64)


# ------------------------------------------------------------------------------------------- profile
def profile_step(args, data: Dataset, rows: int = 12) -> str:
    """torch.profiler table of one mulocal PC step (after one untimed step): top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    net, rule = make_net(args, data), pc_rule(args)
    x, y = data.x_train[:args.batch].to(args.device), data.y_train[:args.batch].to(args.device)
    rule.step(net, x, y)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(args.device).startswith("cuda") else [])
    with profile(activities=acts) as prof:
        rule.step(net, x, y)
    key = "self_cuda_time_total" if str(args.device).startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ------------------------------------------------------------------------------------------- posts
def compare_posts(args, data: Dataset) -> dict:
    """One PC step and one BP step (gradients only, no weight update: every step computes the same numbers) with the
    pooled posts written out (``posts.FAST = True``) and plain (``False``), interleaved over ``args.repeats`` timed
    rounds after an untimed one; the bitwise check compares fresh rules' first steps."""
    net = make_net(args, data)
    x, y = data.x_train[:args.batch].to(args.device), data.y_train[:args.batch].to(args.device)
    rules = dict(PC=lambda: pc_rule(args), BP=lambda: BP(loss=mulocal_loss(args)))
    before = posts.FAST
    try:
        outs = {}
        for fast in (False, True):
            posts.FAST = fast
            for name, make in rules.items():
                outs[name, fast] = make().step(net, x, y)
        equal = {name: all(torch.equal(p, q) for p, q in zip([*outs[name, False][0], outs[name, False][1]],
                                                             [*outs[name, True][0], outs[name, True][1]]))
                 for name in rules}
        steps = {name: make() for name, make in rules.items()}
        times = {(name, fast): [] for name in rules for fast in (False, True)}
        for r in range(args.repeats + 1):
            for fast in ((False, True) if r % 2 else (True, False)):  # alternate which goes first
                posts.FAST = fast
                for name, rule in steps.items():
                    sync(args.device)
                    t0 = time.perf_counter()
                    rule.step(net, x, y)
                    sync(args.device)
                    if r:
                        times[name, fast].append(1000 * (time.perf_counter() - t0))
    finally:
        posts.FAST = before
    ms = {f"{name} {'written' if fast else 'vjp'}": statistics.median(t) for (name, fast), t in times.items()}
    # the speed-up within each round (both paths run back to back), median over rounds: what load drifts leave alone
    ratio = {name: statistics.median(p / q for p, q in zip(times[name, False], times[name, True])) for name in rules}
    return dict(ms=ms, spread={f"{name} {'written' if fast else 'vjp'}": [min(t), max(t)]
                              for (name, fast), t in times.items()},
                pc_bp={kind: ms[f"PC {kind}"] / ms[f"BP {kind}"] for kind in ("vjp", "written")},
                speedup_per_round=ratio, bitwise_equal=equal, repeats=args.repeats)


def print_compare(r: dict) -> None:
    print_header(f"bench_conv --compare-posts: {r['arch']} width {r['width']} (channels {r['channels']}), "
                 f"{r['activation']}, T = {r['T']}, batch {r['batch']}, one PC step and one BP step, median of "
                 f"{r['posts']['repeats']} interleaved rounds", r,
                 f"; threads {r['threads'] or 'default'}; load average {r['env']['load_average_start']} -> "
                 f"{r['env']['load_average_end']}")
    c = r["posts"]
    print(f"bitwise equal (gradients and loss, written vs vjp): "
          f"{', '.join(f'{k} {v}' for k, v in c['bitwise_equal'].items())}\n")
    hdr = f"{'pooled posts':<14} | {'PC ms':>8} {'BP ms':>8} {'PC / BP':>8} | PC range, BP range (ms)"
    print(hdr)
    print("-" * len(hdr))
    for kind, label in (("vjp", "torch.func.vjp"), ("written", "written out")):
        pc, bp = c["ms"][f"PC {kind}"], c["ms"][f"BP {kind}"]
        (p0, p1), (b0, b1) = c["spread"][f"PC {kind}"], c["spread"][f"BP {kind}"]
        print(f"{label:<14} | {pc:>8.1f} {bp:>8.1f} {c['pc_bp'][kind]:>8.2f} | {p0:.0f}-{p1:.0f}, {b0:.0f}-{b1:.0f}")
    print(f"speed-up (vjp / written): of the medians PC {c['ms']['PC vjp'] / c['ms']['PC written']:.2f}x, "
          f"BP {c['ms']['BP vjp'] / c['ms']['BP written']:.2f}x; median of the rounds' PC "
          f"{c['speedup_per_round']['PC']:.2f}x, BP {c['speedup_per_round']['BP']:.2f}x")


# ------------------------------------------------------------------------------------------- data
def get_data(args) -> tuple[Dataset, str, str]:
    """The data set with the subsets asked for; FashionMNIST falls back to random data of its shape."""
    sub = args.train_subset or None
    if args.dataset == "synthetic":
        note = "--dataset synthetic: random images of FashionMNIST's shape"
    else:
        try:
            ds = load_dataset(args.dataset, args.data_dir, train_subset=sub, test_subset=args.test_subset or None,
                              seed=args.seed, download=args.download)
            return ds, f"{ds.name} ({ds.source}), {len(ds.x_train)} training / {len(ds.x_test)} test samples", ""
        except (DataError, ConfigError, OSError) as err:
            if args.dataset == "cifar10":
                raise SystemExit(f"bench_conv: error: CIFAR-10 could not be loaded ({err}); `mulocal data fetch "
                                 f"cifar10` provides it") from None
            note = f"FashionMNIST could not be loaded ({err}); using random images of its shape"
    g = torch.Generator().manual_seed(args.seed)
    n, n_test = sub or 4096, args.test_subset or 1000
    ds = Dataset("synthetic", torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g),
                 torch.randn(n_test, 1, 28, 28, generator=g), torch.randint(0, 10, (n_test,), generator=g), 10,
                 source="random")
    print(f"note: {note}", file=sys.stderr)
    return ds, f"synthetic random (1, 28, 28), {n} training samples", note


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--arch", choices=zoo.ZOO, default="vgg5", help="the zoo net (default vgg5)")
    p.add_argument("--width", type=int, default=32, help="channels = multiples of it; 128 = PCX's full net "
                                                         "(default 32: the quarter-channel net)")
    p.add_argument("--T", type=int, default=PCX_VGG5["T"], help="PC inference steps (default 7, PCX's)")
    p.add_argument("--h-lr", type=float, default=PCX_VGG5["h_lr"], help="PCX's inference step on the batch-mean "
                                                                        "energy (mulocal: kappa = h_lr / batch)")
    p.add_argument("--h-momentum", type=float, default=PCX_VGG5["h_momentum"], help="inference momentum")
    p.add_argument("--lr", type=float, default=PCX_VGG5["lr"], help="AdamW learning rate")
    p.add_argument("--wd", type=float, default=PCX_VGG5["wd"], help="AdamW weight decay")
    p.add_argument("--activation", choices=tuple(zoo.ACTIVATION_MODULES), default=PCX_VGG5["activation"])
    p.add_argument("--loss", choices=("se", "ce"), default=PCX_VGG5["loss"], help="output energy / loss")
    p.add_argument("--batch", type=int, default=PCX_VGG5["batch"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--param", choices=("sp", "mup"), default="sp", help="mulocal's parameterization (default sp)")
    p.add_argument("--base-width", type=int, default=FULL_WIDTH, help="muP's base width (--param mup; default 128)")
    p.add_argument("--no-inference-status", action="store_true", help="mulocal PC without its inference status")
    p.add_argument("--dataset", choices=("fashion-mnist", "cifar10", "synthetic"), default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="allow downloading the data set")
    p.add_argument("--train-subset", type=int, default=4096, help="training samples (0: all; default 4096)")
    p.add_argument("--test-subset", type=int, default=0, help="test samples (0: all, the default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch and XLA (default 1; 0: each "
                                                          "library's default)")
    p.add_argument("--pcx-python", default=None, metavar="PATH", help="a Python with PCX 0.6.3 + JAX 0.4.38")
    p.add_argument("--pcx-placement", choices=("post", "pre"), default="post",
                   help="PCX's value nodes: post (after the pooling, PCX's scripts; default) or pre (mulocal's)")
    p.add_argument("--check-steps", type=int, default=3, help="steps of the agreement check (default 3)")
    p.add_argument("--skip-bp", action="store_true", help="time PC only")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one mulocal PC step")
    p.add_argument("--compare-posts", action="store_true", help="only time one mulocal PC and BP step with the "
                   "pooled posts written out and through torch.func.vjp, interleaved (no training, no PCX)")
    p.add_argument("--repeats", type=int, default=8, help="--compare-posts: timed rounds (median; default 8)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device, "bench_conv")
    if min(args.T, args.batch, args.epochs, args.width, args.check_steps, args.repeats) < 1 or args.threads < 0:
        p.error("--T, --batch, --epochs, --width, --check-steps and --repeats must be >= 1, --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_posts:
        load_start = load_average()
        data, data_desc, note = get_data(args)
        c = compare_posts(args, data)
        blocks, _ = zoo.vgg_plan(args.arch, data.x_train.shape[1:])
        result = dict(benchmark="bench_conv --compare-posts", arch=args.arch, width=args.width,
                      channels=[m * args.width for m, _, _ in blocks], activation=args.activation, T=args.T,
                      batch=args.batch, dataset=data_desc, dataset_note=note, threads=args.threads,
                      env=environment(args.device, load_average_start=load_start, load_average_end=load_average()),
                      posts=c)
        emit(result, args.json, print_compare)
        return 0 if all(c["bitwise_equal"].values()) else 1

    t_start, load_start = time.perf_counter(), load_average()
    data, data_desc, note = get_data(args)
    if len(data.x_train) % args.batch:
        print(f"note: {len(data.x_train)} training samples are not a multiple of the batch: PCX drops the last "
              f"partial batch, mulocal trains it", file=sys.stderr)
    results, loads, check, pcx_info = {}, {}, None, None
    with tempfile.TemporaryDirectory(prefix="bench_conv_") as tmp:
        side = None
        try:
            if args.pcx_python:
                init, ours, w_ours = mulocal_check(args, data, args.check_steps)
                checker = start_pcx(args, data, Path(tmp), init, x64=True)
                try:
                    theirs, w_theirs = checker.check()
                finally:
                    checker.close()
                side = start_pcx(args, data, Path(tmp), init)
                pcx_info = side.info
                check = dict(steps=args.check_steps, losses_mulocal=ours, losses_pcx=theirs,
                             loss=agreement([ours], [theirs]), weights=agreement(w_ours, w_theirs), rtol=AGREE_RTOL)
                check["ok"] = check["loss"]["max_rel"] <= AGREE_RTOL and check["weights"]["max_rel"] <= AGREE_RTOL
                if not check["ok"]:
                    print(f"bench_conv: error: mulocal and PCX (mulocal's placement) disagree over {args.check_steps} "
                          f"identical steps: losses max rel diff {check['loss']['max_rel']:.3g}, weights "
                          f"{check['weights']['max_rel']:.3g} (allowed {AGREE_RTOL:g}); mulocal {ours}, PCX {theirs}",
                          file=sys.stderr)
                    return 1
            jobs = [("mulocal PC", lambda: run_mulocal(args, data, lambda: pc_rule(args)))]
            if side is not None:
                jobs.append(("PCX PC", lambda: side.ask(f"train pc {args.pcx_placement} {args.epochs}")))
            if not args.skip_bp:
                jobs.append(("mulocal BP", lambda: run_mulocal(args, data, lambda: BP(loss=mulocal_loss(args)))))
                if side is not None:
                    jobs.append(("PCX BP", lambda: side.ask(f"train bp post {args.epochs}")))
            for name, job in jobs:
                loads[name] = load_average()
                results[name] = job()
        except (RuntimeError, OSError, ValueError) as err:
            print(f"bench_conv: error: {err}", file=sys.stderr)
            return 1
        finally:
            if side is not None:
                side.close()
    prof = profile_step(args, data) if args.profile else None
    for r in results.values():
        e = r["epochs"]
        r["s_per_epoch"] = min(x["seconds"] for x in e)  # the fastest epoch (load from other processes only adds)
        r["ms_per_step"] = 1000 * r["s_per_epoch"] / max(e[0]["steps"], 1)
        r["acc"] = e[-1]["acc"]
    ratios = {lib: results[f"{lib} PC"]["s_per_epoch"] / results[f"{lib} BP"]["s_per_epoch"]
              for lib in ("mulocal", "PCX") if f"{lib} PC" in results and f"{lib} BP" in results}
    blocks, _ = zoo.vgg_plan(args.arch, data.x_train.shape[1:])
    result = dict(
        benchmark="bench_conv", arch=args.arch, width=args.width,
        channels=[m * args.width for m, _, _ in blocks], activation=args.activation, loss=args.loss, T=args.T,
        h_lr=args.h_lr, kappa=args.h_lr / args.batch, h_momentum=args.h_momentum, lr=args.lr, wd=args.wd,
        batch=args.batch, epochs=args.epochs, param=args.param, dataset=data_desc, dataset_note=note,
        pcx_placement=args.pcx_placement, threads=args.threads,
        env=environment(args.device, load_average_start=load_start, load_average_end=load_average(),
                        pcx=pcx_info),
        agreement=check, results=results, loads=loads, pc_bp_ratio=ratios,
        mulocal_over_pcx_pc=(results["mulocal PC"]["s_per_epoch"] / results["PCX PC"]["s_per_epoch"]
                             if "PCX PC" in results else None),
        profile=prof, total_wall_s=time.perf_counter() - t_start,
        full_command=full_command(args),
    )
    emit(result, args.json, print_table)
    return 0


def full_command(args) -> str:
    return (f"python benchmarks/bench_conv.py --arch {args.arch} --width {FULL_WIDTH} --train-subset 0 --epochs 5 "
            f"--device cuda --threads 0 --pcx-python PATH   # PCX with a CUDA jaxlib; add --dataset cifar10 where "
            f"CIFAR-10 is on disk")


def print_table(r: dict) -> None:
    print_header(f"bench_conv: {r['arch']} width {r['width']} (channels {r['channels']}), {r['activation']}, "
                 f"{r['loss']} output energy, T = {r['T']}, h_lr {r['h_lr']:.4g} (kappa {r['kappa']:.3g}), momentum "
                 f"{r['h_momentum']:.3g}, AdamW lr {r['lr']:.3g} wd {r['wd']:.3g}, batch {r['batch']}, "
                 f"{r['epochs']} epoch(s), mulocal {r['param']}", r,
                 f"; threads per library {r['threads'] or 'default'}; load average {r['env']['load_average_start']}"
                 f" -> {r['env']['load_average_end']}")
    e = r["env"].get("pcx") or {}
    if e:
        where = "after the pooling, PCX's" if r["pcx_placement"] == "post" else "mulocal's"
        print(f"PCX {e.get('pcx')} (JAX {e.get('jax')}, jit) on {e.get('backend')} ({e.get('cpu_count')} cores); "
              f"PCX value nodes: {r['pcx_placement']} ({where} placement)")
    c = r["agreement"]
    if c:
        print(f"agreement (PCX with mulocal's placement, {c['steps']} identical PC + AdamW steps): losses max rel "
              f"{c['loss']['max_rel']:.2e}, weights max rel {c['weights']['max_rel']:.2e} (allowed {c['rtol']:g}): ok")
    print()
    hdr = f"{'run':<12} | {'test acc':>8} {'s/epoch':>8} {'ms/step':>8} {'compile s':>9} | load at start"
    print(hdr)
    print("-" * len(hdr))
    for name, x in r["results"].items():
        comp = x.get("compile_s")
        print(f"{name:<12} | {x['acc']:>8.4f} {x['s_per_epoch']:>8.2f} {x['ms_per_step']:>8.1f} "
              f"{(f'{comp:.1f}' if comp is not None else '-'):>9} | {r['loads'].get(name)}")
    for lib, v in r["pc_bp_ratio"].items():
        print(f"{lib} PC / BP time: {v:.2f}")
    if r["mulocal_over_pcx_pc"] is not None:
        print(f"mulocal PC / PCX PC time: {r['mulocal_over_pcx_pc']:.2f}")
    else:
        print("PCX was not run (no --pcx-python): give a Python with pcx==0.6.3, jax==0.4.38 installed")
    accs = {n: [round(ep['acc'], 4) for ep in x['epochs']] for n, x in r["results"].items()}
    print(f"test accuracy per epoch: {accs}")
    if r["profile"]:
        print("\none mulocal PC step, top operators (torch.profiler):")
        print(r["profile"])
    if r["threads"] != 1:
        print(f"note: more than one thread per library on shared cores: {BUSY_HINT}")
    print(f"\nfull size on a GPU: {r['full_command']}")
    print(f"total wall time {r['total_wall_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
