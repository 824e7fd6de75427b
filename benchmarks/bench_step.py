"""Benchmark: milliseconds per training step of BP, PC and DTP through the Trainer, eager and compiled, for K replicas.

What it measures (3-layer tanh MLP 784 -> M -> M -> 10, muP for SGD, batch 128, FashionMNIST training set):
for every width M in ``--widths`` (default 512,2048), replica count K in ``--Ks`` (default 1,16), learning rule
(``--rules``, default bp, pc (T = 5 parallel inference), dtp (noise_rng="counter", drawn on the device) and
dtp-host (noise_rng="host", what DTP's default "auto" draws with on a CPU: one CPU generator per replica)) and
compile mode (``off`` and the ``--compile`` modes: on a GPU reduce-overhead (torch.compile's CUDA graphs) and
cuda-graph (the eager step recorded as a CUDA graph, no compiler), on the CPU default (inductor's fused kernels);
widths 128,512 and K = 1,8 by default on the CPU), the
wall time of ``--steps`` training steps of the ``Trainer`` (the rule's step, the optimizer step and the
device-side bookkeeping; the end-of-epoch evaluation is not counted: ``epoch_time``). Each configuration keeps
one Trainer: its first epoch (``--warmup`` steps, at least 3 for cuda-graph: the first step, its warm-up steps and
the capture) warms up, and compiles or captures when asked; every repeat then trains
one more epoch of ``--steps`` steps, and the fastest repeat is reported. Repeats are interleaved (every
configuration once, then again).

The table, per width and rule: ms/step at each K, the replica gain (K_max replica-steps per second over K = 1's),
the cost against BP at the same K and mode, and compiled / eager. Issue 13's targets, on one H100/H200: at
K = 16, replica gain >= 12x at width 512 and DTP/BP <= 3x at widths 512 and 2048; compiled K = 1 width 512 BP
<= 0.25 ms, PC T = 5 <= 0.8 ms, DTP <= 0.8 ms. A rule that cannot be compiled (dtp-host) runs eagerly and
says so. The compile of a configuration happens in its warm-up, whose seconds are printed (``warm-up``).

Run:

    python benchmarks/bench_step.py --device cuda                     # the GPU table
    python benchmarks/bench_step.py --widths 128 --Ks 1,4 --steps 20 --compile default   # CPU, small
    python benchmarks/bench_step.py --json
"""
from __future__ import annotations

import json
import time

from _common import (BATCH, BUSY_HINT, DEPTH, SPREAD_WARN, add_data_args, add_device_arg, add_timing_args, emit,
                     environment, interleaved, load_average, load_data, make_parser, parse_ints, print_header,
                     resolve_device, spread, KeptTrainer)
from mulocal.algos import make_algo
from mulocal.nets import build
from mulocal.param import preset
from mulocal.train import COMPILE_MODES, TrainConfig

RULES = {"bp": ("bp", {}), "pc": ("pc", {"T": 5, "inference": "parallel"}),
         "dtp": ("dtp", {"noise_rng": "counter"}), "dtp-host": ("dtp", {"noise_rng": "host"})}


class Config(KeptTrainer):
    """One (width, K, rule, mode): a Trainer kept across repeats; each call returns seconds per step."""

    def __init__(self, data, width: int, K: int, rule: str, mode: str, steps: int, warmup: int, device: str):
        name, opts = RULES[rule]
        net = build("mlp", data.input_shape, data.n_classes, width, preset("mup", "sgd"), depth=DEPTH, K=K,
                    seeds=list(range(K)), device=device)
        cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=[0.05] * K, optimizer="sgd", progress=False,
                          max_steps=max(warmup, 1), compile=mode)
        super().__init__(net, make_algo(name, **opts), data, cfg, list(range(K)), steps)

    def __call__(self) -> float:
        return super().__call__() / self.steps

    @property
    def compile_info(self) -> dict:
        return self.trainer.compile_info


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--widths", default=None, help="comma-separated widths (default 512,2048 on a GPU, 128,512 on "
                                                  "the CPU)")
    p.add_argument("--Ks", default=None, help="comma-separated replica counts (default 1,16 on a GPU, 1,8 on the CPU)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated rules (default {','.join(RULES)})")
    p.add_argument("--compile", default=None,
                   help="comma-separated compiled modes timed next to eager, of "
                        f"{', '.join(m for m in COMPILE_MODES if m != 'off')} (default reduce-overhead,cuda-graph on a "
                        "GPU, default on the CPU; none: eager only)")
    p.add_argument("--compile-widths", default=None, help="time the compiled mode at these widths only (default all)")
    p.add_argument("--compile-Ks", default=None, help="time the compiled mode at these K only (default all)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    add_timing_args(p, steps=100, warmup=10)
    add_device_arg(p)
    add_data_args(p)
    args = p.parse_args(argv)
    args.device = resolve_device(args.device, "bench_step")
    gpu = args.device.startswith("cuda")
    widths = parse_ints(args.widths or ("512,2048" if gpu else "128,512"), "--widths")
    Ks = parse_ints(args.Ks or ("1,16" if gpu else "1,8"), "--Ks")
    args.compile = args.compile or ("reduce-overhead,cuda-graph" if gpu else "default")
    compiled = [] if args.compile == "none" else [m for m in args.compile.split(",") if m]
    if any(m not in COMPILE_MODES or m == "off" for m in compiled):
        p.error(f"--compile: choose from {', '.join(m for m in COMPILE_MODES if m != 'off')} or none, got "
                f"{args.compile!r}")
    rules = [r for r in args.rules.split(",") if r]
    bad = [r for r in rules if r not in RULES]
    if bad or not rules:
        p.error(f"unknown rule(s) {bad}; choose from {', '.join(RULES)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    modes = ["off"] + compiled
    t_start, load_start = time.perf_counter(), load_average()
    data, data_desc, note = load_data(args, n_eval=16)
    steps = min(args.steps, len(data.x_train) // BATCH)

    cw = widths if args.compile_widths is None else parse_ints(args.compile_widths, "--compile-widths")
    cK = Ks if args.compile_Ks is None else parse_ints(args.compile_Ks, "--compile-Ks")
    configs = {(w, K, r, m): Config(data, w, K, r, m, steps, args.warmup, args.device)
               for w in widths for K in Ks for r in rules for m in modes if m == "off" or (w in cw and K in cK)}
    raw = interleaved(configs, args.repeats)
    rows = []
    for (w, K, r, m), times in raw.items():
        c = configs[(w, K, r, m)]
        rows.append(dict(width=w, K=K, rule=r, mode=m, ms_per_step=1e3 * min(times), spread=spread(times),
                         warmup_s=c.warmup_s, compiled=c.compile_info["used"], graphs=c.compile_info["graphs"],
                         fallback=c.compile_info["fallback"]))

    def ms(w, K, r, m):
        return next((x["ms_per_step"] for x in rows if (x["width"], x["K"], x["rule"], x["mode"]) == (w, K, r, m)),
                    None)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    summary = []
    k0, k1 = Ks[0], Ks[-1]
    for w in widths:
        for r in rules:
            for m in modes:
                if not any(ms(w, K, r, m) is not None for K in Ks):
                    continue
                s = dict(width=w, rule=r, mode=m, ms={K: ms(w, K, r, m) for K in Ks})
                if k1 != k0:
                    s["replica_gain"] = ratio(ratio(k1, ms(w, k1, r, m)), ratio(k0, ms(w, k0, r, m)))
                if "bp" in rules:
                    s["over_bp"] = {K: ratio(ms(w, K, r, m), ms(w, K, "bp", m)) for K in Ks}
                if m != "off":
                    s["compiled_over_eager"] = {K: ratio(ms(w, K, r, m), ms(w, K, r, "off")) for K in Ks}
                summary.append(s)
    result = dict(benchmark="bench_step", model=f"mlp depth {DEPTH} tanh 784 -> M -> M -> 10, muP SGD, batch {BATCH}",
                  dataset=data_desc, dataset_note=note, steps=steps, warmup=args.warmup, repeats=args.repeats,
                  Ks=Ks, modes=modes, rules={r: RULES[r] for r in rules},
                  env=environment(args.device, load_average_start=load_start, load_average_end=load_average()),
                  rows=rows, summary=summary, max_repeat_spread=max(x["spread"] for x in rows),
                  total_wall_s=time.perf_counter() - t_start)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    emit(result, args.json, print_table)
    return 0


def print_table(r: dict) -> None:
    print_header(f"ms per training step (Trainer), {r['model']}; {r['steps']} steps, best of {r['repeats']}", r)
    Ks = r["Ks"]
    head = " | ".join(f"K={K} ms" for K in Ks)
    extra = (" | gain" if len(Ks) > 1 else "") + " | /BP at K=" + ",".join(map(str, Ks)) + " | compiled/eager"
    print(f"| width | rule | mode | {head}{extra} |")
    print("|" + "---|" * (3 + len(Ks) + (1 if len(Ks) > 1 else 0) + 2))
    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    for s in r["summary"]:
        cells = [fmt(s["ms"][K], ".3f") for K in Ks]
        if len(Ks) > 1:
            cells.append(fmt(s["replica_gain"], ".1f") + ("x" if s["replica_gain"] is not None else ""))
        cells.append(", ".join(fmt(v) for v in s["over_bp"].values()) if "over_bp" in s else "-")
        cells.append(", ".join(fmt(v) for v in s["compiled_over_eager"].values())
                     if "compiled_over_eager" in s else "-")
        print(f"| {s['width']} | {s['rule']} | {s['mode']} | " + " | ".join(cells) + " |")
    for x in r["rows"]:
        if x["mode"] != "off":
            how = (f"compiled ({x['graphs']} graph(s))" if x["compiled"] else f"eager: {x['fallback']}")
            print(f"  width {x['width']} K={x['K']} {x['rule']} {x['mode']}: {how}; warm-up {x['warmup_s']:.1f} s")
    if r["max_repeat_spread"] > SPREAD_WARN:
        print(f"warning: repeats differ up to {r['max_repeat_spread']:.1f}x: {BUSY_HINT}")


if __name__ == "__main__":
    raise SystemExit(main())
