"""Benchmark: predictive-coding (PC) training speed of mulocal on the CPU or ``--device``, against BP, PCX and a naive PC.

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
2. mulocal against PCX (``--pcx-python PATH``: a Python with PCX 0.6.3 and JAX 0.4.38 installed, e.g.
   ``python3 -m venv pcx-venv && pcx-venv/bin/pip install pcx==0.6.3 jax==0.4.38 jaxlib==0.4.38``),
   side by side in this run: the PC MLP 784 -> 512 -> 512 -> 10, tanh, T = 5 parallel inference steps of SGD
   on the values (step ``--pcx-h-lr``, default 0.1), SGD on the weights (``--lr``), batch 128, float32, SP
   (every gamma and multiplier 1: the model PCX writes). mulocal: ``PC(T=5, inference="parallel",
   kappa=h_lr)`` with its defaults otherwise (the inference status on), trained by the ``Trainer``; PCX:
   ``benchmarks/_pcx_side.py`` run in a child process with that Python (one ``pxf.jit``-compiled training
   step per batch, the loss summed on the device; ``_pcx_compare.py`` starts it and holds mulocal's side of the
   check). Before timing, both start from the same weights (written to an .npz in a temporary folder) and train
   ``--check-steps`` (default 5) identical batches: the feed-forward losses of every step must agree to 1e-4
   relative (and the weights after them), else the script stops with status 1. The timed repeats alternate
   mulocal / PCX; the table gives the s/epoch of each (best repeat, 469 steps) and the ratio mulocal / PCX of
   this run. Without ``--pcx-python`` the mulocal side is measured alone and the table says that PCX was not run.
3. In the same run, the mulocal PC of the PCX-size model with its own defaults (muP, sequential and
   parallel inference) and a naive eager-torch PC of that configuration (``_naive_pc.py``)
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

Everything of mulocal runs on ``--device`` (default cpu; ``cuda`` for a GPU); PCX runs on its JAX's default
backend (printed). A device that is not available here stops the script with one line on stderr (status 2).

Run (a default run takes about 2 minutes on 2 CPU cores):

    python benchmarks/bench_pc.py
    python benchmarks/bench_pc.py --pcx-python pcx-venv/bin/python --widths 512 --Ts 5   # against PCX
    python benchmarks/bench_pc.py --steps 20 --repeats 2     # quick check
    python benchmarks/bench_pc.py --widths 512,1024 --Ts 1,5,20
    python benchmarks/bench_pc.py --json                     # one JSON object on stdout instead of the table
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

from _common import (BATCH, BUSY_HINT, DEPTH, SPREAD_WARN, add_data_args, add_device_arg, add_timing_args, emit,
                     environment, interleaved, load_average, load_data, make_parser, parse_ints, print_header,
                     resolve_device, KeptTrainer)
from _naive_pc import check_naive, time_naive
from _pcx_compare import (AGREE_RTOL, PCX_T, PCX_WIDTH, _flat, agreement, agrees, mulocal_check, pcx_rule,
                          start_pcx)
from mulocal.algos.bp import BP
from mulocal.algos.pc import PC
from mulocal.data import Dataset
from mulocal.nets import build
from mulocal.param import preset
from mulocal.train import COMPILE_MODES, Trainer, TrainConfig

N_EVAL = 256  # test samples kept for the Trainer's end-of-epoch evaluation (not timed)


# ------------------------------------------------------------------------------------- mulocal
def time_mulocal(data: Dataset, width: int, make_rule, lr: float, steps: int, warmup: int, device: str = "cpu",
                 param: str = "mup") -> tuple[float, str]:
    """(seconds for ``steps`` training steps after ``warmup`` untimed ones, replica status)."""
    net = build("mlp", data.input_shape, data.n_classes, width, preset(param, "sgd"), depth=DEPTH, K=1, seeds=[0],
                device=device)
    rule = make_rule()

    def train(n: int) -> tuple[float, str]:
        cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=lr, optimizer="sgd", progress=False, max_steps=n)
        res = Trainer(net, rule, data, cfg, seeds=[0]).run()
        rows = [h for h in res["replicas"][0]["history"] if "event" not in h]
        return rows[-1]["epoch_time"], res["replicas"][0]["status"]

    if warmup:
        train(warmup)
    return train(steps)


def compiled_job(data: Dataset, width: int, make_rule, lr: float, steps: int, warmup: int, device: str, mode: str,
                 param: str = "sp"):
    """A job timing mulocal with ``TrainConfig.compile = mode``: its first call builds one ``KeptTrainer`` (a
    warm-up epoch of ``max(warmup, 2)`` steps: the first step eager, the compile at the second); every call then
    trains one more epoch of ``steps`` steps on it and returns (seconds, status, compile info)."""
    state = {}

    def job():
        if not state:
            net = build("mlp", data.input_shape, data.n_classes, width, preset(param, "sgd"), depth=DEPTH, K=1,
                        seeds=[0], device=device)
            cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=lr, optimizer="sgd", progress=False,
                              max_steps=max(warmup, 2), compile=mode)
            state["kept"] = KeptTrainer(net, make_rule(), data, cfg, [0], steps)
        kept = state["kept"]
        seconds = kept()
        return seconds, kept.result["replicas"][0]["status"], dict(kept.trainer.compile_info)
    return job


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
    return {"pcx_mulocal": f"mulocal PC, PCX settings M={PCX_WIDTH}", "pcx": f"PCX M={PCX_WIDTH}",
            "pcx_seq": f"mulocal PC sequential M={PCX_WIDTH}", "pcx_par": f"mulocal PC parallel M={PCX_WIDTH}",
            "pcx_naive": f"naive PC M={PCX_WIDTH}",
            "pcx_mulocal_compiled": f"mulocal PC, PCX settings, compiled M={PCX_WIDTH}"}[key]


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--widths", "--width", dest="widths", default="1024",
                   help="comma-separated width(s) M of the PC-vs-BP T table (default 1024)")
    p.add_argument("--Ts", default="1,5,20", help="comma-separated inference steps T of that table (default 1,5,20)")
    add_timing_args(p, steps=100, warmup=5)
    p.add_argument("--lr", type=float, default=0.1, help="base SGD learning rate (default 0.1)")
    p.add_argument("--pcx-python", default=None, metavar="PATH",
                   help="a Python with PCX 0.6.3 + JAX 0.4.38: run PCX's PC MLP side by side (section 2)")
    p.add_argument("--pcx-h-lr", type=float, default=0.1, help="inference step (SGD on the values) of section 2 "
                                                               "(default 0.1)")
    p.add_argument("--compile", default="none", choices=["none"] + [m for m in COMPILE_MODES if m != "off"],
                   help="also time section 2's mulocal PC with TrainConfig.compile = this mode (torch.compile of "
                        "the training step; default none)")
    p.add_argument("--check-steps", type=int, default=5,
                   help="training steps of the mulocal-vs-PCX loss agreement check (default 5)")
    add_device_arg(p)
    add_data_args(p)
    args = p.parse_args(argv)
    args.device = resolve_device(args.device, "bench_pc")
    widths, Ts = parse_ints(args.widths, "--widths"), parse_ints(args.Ts, "--Ts")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.check_steps < 1:
        p.error("--steps, --repeats and --check-steps must be >= 1, --warmup >= 0")
    if not math.isfinite(args.lr) or args.lr < 0 or not (math.isfinite(args.pcx_h_lr) and args.pcx_h_lr > 0):
        p.error("--lr must be finite and >= 0, --pcx-h-lr finite and > 0")

    t_start = time.perf_counter()
    load_start = load_average()
    data, data_desc, note = load_data(args, n_eval=N_EVAL)
    n_train = len(data.x_train)
    steps_per_epoch = math.ceil(n_train / BATCH)  # 469 for FashionMNIST
    steps, warmup = min(args.steps, steps_per_epoch), min(args.warmup, steps_per_epoch)
    if steps != args.steps:
        print(f"note: --steps capped at one epoch ({steps_per_epoch} steps)", file=sys.stderr)
    lr, dev, h_lr = args.lr, args.device, args.pcx_h_lr
    in_dim = math.prod(data.input_shape)

    with tempfile.TemporaryDirectory(prefix="bench_pc_") as tmp:
        pcx_side, check = None, None
        if args.pcx_python:
            # the agreement check first: same weights, same batches, the same losses, else stop
            init, ours, w_ours = mulocal_check(data, PCX_WIDTH, h_lr, lr, args.check_steps, dev)
            try:
                pcx_side = start_pcx(args.pcx_python, data, Path(tmp), init, h_lr, lr, args.check_steps)
                theirs, w_theirs = pcx_side.check()
            except (RuntimeError, OSError, ValueError) as err:
                if pcx_side is not None:
                    pcx_side.close()
                print(f"bench_pc: error: {err}", file=sys.stderr)
                return 1
            check = dict(steps=args.check_steps, losses_mulocal=ours, losses_pcx=theirs,
                         loss=agreement(ours, theirs),
                         weights=agreement(_flat(w_ours), _flat(w_theirs)),
                         rtol=AGREE_RTOL)
            check["ok"] = agrees(check["loss"]) and agrees(check["weights"])
            if not check["ok"]:
                pcx_side.close()
                print(f"bench_pc: error: mulocal and PCX disagree over {args.check_steps} identical steps: losses "
                      f"max rel diff {check['loss']['max_rel']:.3g}, weights {check['weights']['max_rel']:.3g} "
                      f"(allowed {AGREE_RTOL:g}); mulocal {ours}, PCX {theirs}", file=sys.stderr)
                return 1

        # 1: PC vs BP at each width, for each T (all configurations interleaved per repeat)
        jobs = {}
        for w in widths:
            jobs[(w, "bp")] = lambda w=w: time_mulocal(data, w, BP, lr, steps, warmup, dev)
            for T in Ts:
                jobs[(w, T)] = lambda w=w, T=T: time_mulocal(
                    data, w, lambda: PC(T=T, inference="sequential", fpa=False), lr, steps, warmup, dev)
        # 2: mulocal with PCX's settings, then PCX (alternating within every repeat)
        jobs["pcx_mulocal"] = lambda: time_mulocal(data, PCX_WIDTH, lambda: pcx_rule(h_lr), lr, steps, warmup, dev,
                                                   param="sp")
        if args.compile != "none":
            jobs["pcx_mulocal_compiled"] = compiled_job(data, PCX_WIDTH, lambda: pcx_rule(h_lr), lr, steps, warmup,
                                                        dev, args.compile)
        if pcx_side is not None:
            def run_pcx():
                if warmup:
                    pcx_side.time(warmup)
                return pcx_side.time(steps)
            jobs["pcx"] = run_pcx
        # 3: mulocal's own defaults at the PCX size (sequential and parallel inference), the naive autograd PC
        jobs["pcx_seq"] = lambda: time_mulocal(
            data, PCX_WIDTH, lambda: PC(T=PCX_T, inference="sequential", fpa=False), lr, steps, warmup, dev)
        jobs["pcx_par"] = lambda: time_mulocal(
            data, PCX_WIDTH, lambda: PC(T=PCX_T, inference="parallel", fpa=False), lr, steps, warmup, dev)
        jobs["pcx_naive"] = lambda: time_naive(data, PCX_WIDTH, PCX_T, lr, steps, warmup, device=dev)
        try:
            raw = interleaved(jobs, args.repeats)
        finally:
            pcx_info = pcx_side.info if pcx_side is not None else None
            if pcx_side is not None:
                pcx_side.close()
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

    mine, seq, par, nv = res["pcx_mulocal"], res["pcx_seq"], res["pcx_par"], res["pcx_naive"]
    comp = res.get("pcx_mulocal_compiled")
    if comp is not None:
        comp["compile"] = min(raw["pcx_mulocal_compiled"], key=lambda r: r[0])[2]
    pcx = dict(
        width=PCX_WIDTH, T=PCX_T, h_lr=h_lr, steps_per_epoch=steps_per_epoch,
        mulocal=mine, pcx=res.get("pcx"), pcx_run=pcx_side is not None, pcx_python=args.pcx_python,
        pcx_env=pcx_info, agreement=check,
        ratio_mulocal_over_pcx=mine["seconds"] / res["pcx"]["seconds"] if "pcx" in res else None,
        compile_mode=args.compile, mulocal_compiled=comp,
        ratio_compiled_over_pcx=comp["seconds"] / res["pcx"]["seconds"] if comp and "pcx" in res else None,
        ratio_compiled_over_eager=comp["seconds"] / mine["seconds"] if comp else None,
        mulocal_sequential=seq, mulocal_parallel=par, naive=nv,
        ratio_mulocal_over_naive=seq["seconds"] / nv["seconds"],
        ratio_mulocal_parallel_over_naive=par["seconds"] / nv["seconds"],
        naive_check=check_naive(data, PCX_WIDTH, PCX_T, dev),
    )

    result = dict(
        benchmark="bench_pc",
        model=f"mlp depth {DEPTH} tanh 784 -> M -> M -> 10, SGD; mulocal: muP (mup-sgd), PC(T, sequential, no FPA, "
              "forward init); vs PCX: SP, PC(T=5, parallel, kappa=h_lr); naive: nn.Linear + autograd on the "
              "energy + torch.optim.SGD (SP init, gamma = 1)",
        dataset=data_desc, dataset_note=note, n_train=n_train, batch_size=BATCH, steps=steps, warmup=warmup,
        steps_per_epoch=steps_per_epoch, repeats=args.repeats, lr=lr,
        env=environment(dev, load_average_start=load_start, load_average_end=load_average()),
        pc_vs_bp=table, pcx_config=pcx,
        repeat_spread={label(k): round(v["spread"], 3) for k, v in res.items()},
        max_repeat_spread=max(r["spread"] for r in res.values()),
        total_wall_s=time.perf_counter() - t_start,
    )
    emit(result, args.json, print_table)
    return 0


def print_table(r: dict) -> None:
    print_header(f"mulocal PC benchmark: 784 -> M -> M -> 10 tanh MLP, batch {r['batch_size']}, SGD (lr {r['lr']:g})",
                 r, f"; load average {r['env'].get('load_average_start')} -> {r['env'].get('load_average_end')}")
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
    print(f"2. mulocal vs PCX: PC MLP 784-{x['width']}-{x['width']}-10 tanh, T = {x['T']} parallel (step "
          f"{x['h_lr']:g}), SGD, batch {r['batch_size']}, float32, SP; epoch = {x['steps_per_epoch']} steps")
    hdr = f"{'implementation':<44} | {'s/epoch':>8} {'ms/step':>8}"
    print(hdr)
    print("-" * len(hdr))
    m = x["mulocal"]
    print(f"{'mulocal PC (parallel, kappa = step, status on)':<44} | {m['epoch_s']:>8.2f} {m['ms_per_step']:>8.2f}")
    comp = x.get("mulocal_compiled")
    if comp:
        how = "compiled" if comp["compile"]["used"] else f"eager: {comp['compile']['fallback']}"
        print(f"{'  the same, compile=' + x['compile_mode'] + ' (' + how + ')':<44} | {comp['epoch_s']:>8.2f} "
              f"{comp['ms_per_step']:>8.2f}")
    if x["pcx_run"]:
        q, e = x["pcx"], x["pcx_env"] or {}
        print(f"{'PCX ' + str(e.get('pcx')) + ' (JAX ' + str(e.get('jax')) + ', jit)':<44} | {q['epoch_s']:>8.2f} "
              f"{q['ms_per_step']:>8.2f}")
        if comp:
            print(f"ratio mulocal compiled / PCX: {x['ratio_compiled_over_pcx']:.2f}; compiled / eager "
                  f"{x['ratio_compiled_over_eager']:.2f}")
        print(f"ratio mulocal / PCX (this run, repeats alternating): {x['ratio_mulocal_over_pcx']:.2f}   threads: "
              f"torch {r['env']['torch_threads']}, JAX/XLA on {e.get('backend')} with {e.get('cpu_count')} cores "
              f"(its default pool)")
        c = x["agreement"]
        print(f"agreement over {c['steps']} identical steps (same weights and batches): losses max |diff| "
              f"{c['loss']['max_abs']:.2e} (rel {c['loss']['max_rel']:.2e}), weights max |diff| "
              f"{c['weights']['max_abs']:.2e} (rel {c['weights']['max_rel']:.2e}); allowed {c['rtol']:g} relative: ok")
    else:
        print("PCX was not run (no --pcx-python): no ratio. Give a Python with pcx==0.6.3, jax==0.4.38 installed.")

    print()
    print(f"3. mulocal's own defaults at the PCX size (muP, T = {x['T']}) and a naive eager-torch PC")
    hdr = f"{'implementation':<44} | {'s/epoch':>8} {'ms/step':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, d in (("mulocal PC (sequential inference)", x["mulocal_sequential"]),
                    ("mulocal PC (parallel inference)", x["mulocal_parallel"]),
                    ("naive PC (autograd, benchmarks/_naive_pc.py)", x["naive"])):
        print(f"{name:<44} | {d['epoch_s']:>8.2f} {d['ms_per_step']:>8.2f}")
    print(f"mulocal / naive: {x['ratio_mulocal_over_naive']:.2f} (sequential), "
          f"{x['ratio_mulocal_parallel_over_naive']:.2f} (parallel; the naive code's inference is parallel)")
    c = x["naive_check"]
    print(f"check: naive vs mulocal parallel PC weight gradients on one batch (same SP weights): "
          f"max |diff| = {c['max_abs_grad_diff']:.2e} (largest gradient entry {c['max_abs_grad']:.2e})")

    statuses = [b["bp"].get("status") for b in r["pc_vs_bp"]] + [row["pc"].get("status") for b in r["pc_vs_bp"]
                                                                  for row in b["pc"]]
    statuses += [x[k].get("status") for k in ("mulocal", "mulocal_sequential", "mulocal_parallel")]
    if any(s == "diverged" for s in statuses):
        print("note: some mulocal runs diverged (their steps are still computed, so the timings stand)")
    if r["max_repeat_spread"] > SPREAD_WARN:
        worst = ", ".join(f"{k} {v:.1f}x" for k, v in r["repeat_spread"].items() if v > SPREAD_WARN)
        print(f"warning: repeats of one measurement differed by more than {SPREAD_WARN}x ({worst}); {BUSY_HINT}")
    print(f"\ntotal wall time {r['total_wall_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
