"""Benchmark: a user's model through the adapter against the native net of the same architecture, side by side.

What it measures: the native 3-layer tanh MLP (784 -> M -> M -> 10, ``nets.MLP``) and the same architecture written
as a user would (``nn.Sequential(Flatten, Linear, Tanh, Linear, Tanh, Linear)``) run through ``adapter.ModuleNet``,
muP for SGD, batch 128, FashionMNIST: milliseconds per training step of the ``Trainer`` (the rule's step, the
optimizer step, the bookkeeping) for each rule (``--rules``, default bp and pc: the default sequential inference,
and pc-parallel: T = 5 parallel inference), width (``--widths``, default 128,512 on the CPU, 512,2048 on a GPU) and
replica count (``--Ks``, default 1,8). Each configuration keeps one Trainer, warms up, then the repeats are
interleaved (every configuration once, then again) and the fastest is reported. The table prints adapter / native
per row; issue 24's target: <= 1.3x on 2 CPU cores and on a GPU. A residual conv net of a user's two-conv blocks
(general blocks: local autograd inside each, no native twin) is timed too with ``--general``, against BP on it.

Run:

    python benchmarks/bench_adapter.py                       # CPU
    python benchmarks/bench_adapter.py --device cuda --widths 512,2048 --Ks 1,16
    python benchmarks/bench_adapter.py --json
"""
from __future__ import annotations

import json
import time

from torch import nn

from _common import (BATCH, BUSY_HINT, SPREAD_WARN, KeptTrainer, add_data_args, add_device_arg, add_timing_args, emit,
                     environment, interleaved, load_average, load_data, make_parser, parse_ints, resolve_device,
                     spread)
from mulocal.adapter import ModuleNet
from mulocal.algos import make_algo
from mulocal.nets import build
from mulocal.param import preset
from mulocal.train import TrainConfig

RULES = {"bp": ("bp", {}), "pc": ("pc", {}), "pc-parallel": ("pc", {"T": 5, "inference": "parallel"})}


def user_mlp(width):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 10))


class Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.conv1(x.relu()).relu())


def user_resnet(width):
    return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, width, 3, padding=1), Block(width), Block(width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 49, 10))


class Config(KeptTrainer):
    def __init__(self, data, width, K, rule, side, steps, warmup, device):
        name, opts = RULES[rule]
        param = preset("mup", "sgd")
        if side == "native":
            net = build("mlp", data.input_shape, data.n_classes, width, param, depth=3, K=K, seeds=list(range(K)),
                        device=device)
        else:
            make = user_mlp if side == "adapter" else user_resnet
            net = ModuleNet(make, data.input_shape, width, param, K=K, seeds=list(range(K)), device=device)
        cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=[0.05] * K, optimizer="sgd", progress=False,
                          max_steps=max(warmup, 1))
        super().__init__(net, make_algo(name, **opts), data, cfg, list(range(K)), steps)

    def __call__(self) -> float:
        return super().__call__() / self.steps


def print_table(result, args) -> None:
    summary = result["summary"]
    print(f"adapter (a user's nn.Sequential through ModuleNet) vs the native MLP, {result['dataset']}, "
          f"{result['steps']} steps, fastest of {result['repeats']}, {result['env']['device']}")
    print(f"{'width':>6}{'K':>4}  {'rule':<12}{'native ms':>10}{'adapter ms':>11}{'adapter/native':>16}")
    for s in summary:
        print(f"{s['width']:>6}{s['K']:>4}  {s['rule']:<12}{s['native_ms']:>10.2f}{s['adapter_ms']:>11.2f}"
              f"{s['ratio']:>16.2f}")
    print(f"max adapter/native: {result['max_ratio']:.2f} (target <= 1.3)")
    general = [x for x in result["rows"] if x["side"] == "general"]
    for w in sorted({x["width"] for x in general}):
        t = {x["rule"]: x["ms_per_step"] for x in general if x["width"] == w}
        print(f"general blocks (residual conv net of two-conv user blocks), width {w}: bp {t['bp']:.1f} ms, "
              f"pc {t['pc']:.1f} ms (pc/bp {t['pc'] / t['bp']:.2f})")
    if any(x["spread"] > SPREAD_WARN for x in result["rows"]):
        print(f"note: some repeats differ by more than {SPREAD_WARN}x: {BUSY_HINT}")


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--widths", default=None, help="comma-separated widths (default 128,512; 512,2048 on a GPU)")
    p.add_argument("--Ks", default="1,8", help="comma-separated replica counts (default 1,8)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated rules (default {','.join(RULES)})")
    p.add_argument("--general", action="store_true", help="also time a residual conv net of general blocks")
    add_timing_args(p, steps=30, warmup=5, repeats=5)
    add_device_arg(p)
    add_data_args(p)
    args = p.parse_args(argv)
    args.device = resolve_device(args.device, "bench_adapter")
    widths = parse_ints(args.widths or ("512,2048" if args.device.startswith("cuda") else "128,512"), "--widths")
    Ks = parse_ints(args.Ks, "--Ks")
    rules = [r for r in args.rules.split(",") if r]
    if any(r not in RULES for r in rules) or not rules:
        p.error(f"--rules: choose from {', '.join(RULES)}")
    load_start = load_average()
    data, data_desc, note = load_data(args, n_eval=16)
    steps = min(args.steps, len(data.x_train) // BATCH)
    sides = ("native", "adapter")
    jobs = {(w, K, r, s): Config(data, w, K, r, s, steps, args.warmup, args.device)
            for w in widths for K in Ks for r in rules for s in sides}
    if args.general:
        jobs.update({(w, K, r, "general"): Config(data, w, K, r, "general", steps, args.warmup, args.device)
                     for w in (16, 32) for K in Ks[:1] for r in ("bp", "pc")})
    raw = interleaved(jobs, args.repeats)
    rows = []
    for (w, K, r, s), times in raw.items():
        rows.append(dict(width=w, K=K, rule=r, side=s, ms_per_step=1e3 * min(times), spread=spread(times)))

    def ms(w, K, r, s):
        return next((x["ms_per_step"] for x in rows if (x["width"], x["K"], x["rule"], x["side"]) == (w, K, r, s)),
                    None)
    summary = [dict(width=w, K=K, rule=r, native_ms=ms(w, K, r, "native"), adapter_ms=ms(w, K, r, "adapter"),
                    ratio=ms(w, K, r, "adapter") / ms(w, K, r, "native"))
               for w in widths for K in Ks for r in rules]
    result = dict(benchmark="bench_adapter", model="mlp depth 3 tanh 784 -> M -> M -> 10, muP SGD, batch 128",
                  dataset=data_desc, dataset_note=note, steps=steps, repeats=args.repeats, rows=rows,
                  summary=summary, max_ratio=max(s["ratio"] for s in summary), target=1.3,
                  env=environment(args.device, load_average_start=load_start, load_average_end=load_average()))
    emit(result, args.json, lambda r: print_table(r, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
