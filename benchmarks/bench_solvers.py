"""Benchmark: PC's inference solvers on residual MLPs: time per training step relative to BP, and how close to
equilibrium each gets (the "which solver when" table of docs/pc.md).

What it measures (``--arch resmlp`` of depth H in ``--depths``, default 8 and 32, width ``--width`` (default 256),
tanh, muP with Depth-muP for SGD, batch 128, FashionMNIST training set, K = 1): for BP and each PC solver
configuration (sequential single shot, T = 1; parallel, T = 5 with the curvature-bound step; the error solver at
T = 1, 3 (the residual-net default) and 6, with its default guard, and at T = 3 without it; muPC's recipe, T = H
parallel steps of jpc's activity step 0.5 / batch-mean energy), the wall time of ``--steps`` plain training steps
(the rule's step and the SGD step, the loss read back each step), in the same run, interleaved repeats, the
fastest reported; then the ratio to BP's time, and the solver's inference status over those steps: the mean
final relative residual ||dF/dv(v_T)|| / ||dF/dv(v_0)|| and the fraction of steps in which the energy rose.

Run:

    python benchmarks/bench_solvers.py                       # about 2 minutes on 2 CPU cores
    python benchmarks/bench_solvers.py --depths 8,32,128 --width 512 --device cuda
    python benchmarks/bench_solvers.py --json
"""
from __future__ import annotations

import torch

from _common import (add_data_args, add_device_arg, add_timing_args, emit, environment, interleaved, load_data,
                     make_parser, parse_ints, print_header, resolve_device, shuffled_steps)

from mulocal.algos import make_algo
from mulocal.nets import build
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset

RULES = {  # label -> (rule, options)
    "bp": ("bp", {}),
    "pc sequential T=1": ("pc", {"inference": "sequential", "T": 1}),
    "pc parallel T=5": ("pc", {"inference": "parallel", "T": 5}),
    "pc error T=1": ("pc", {"inference": "error", "T": 1}),
    "pc error T=3 (default)": ("pc", {}),
    "pc error T=6": ("pc", {"inference": "error", "T": 6}),
    "pc error T=3 no guard": ("pc", {"inference": "error", "T": 3, "guard": False}),
    "pc mupc T=H": ("pc", {"inference": "mupc"}),
}
LR = 0.1


def run(args) -> dict:
    device = resolve_device(args.device, "bench_solvers")
    data, name, note = load_data(args)
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    out = {"dataset": name, "dataset_note": note, "env": environment(device), "width": args.width, "depths": {}}
    for H in parse_ints(args.depths, "--depths"):
        jobs, rules = {}, {}
        for label, (algo, opts) in RULES.items():
            net = build("resmlp", data.input_shape, data.n_classes, args.width, preset("mup", "sgd"), depth=H,
                        seeds=[0], device=device)
            rule = make_algo(algo, **opts)
            opt = LayerwiseOptimizer.for_net(net, LR, "sgd")

            def step(idx, net=net, rule=rule, opt=opt):
                grads, loss = rule.step(net, x_all[idx], y_all[idx])
                opt.step(grads)
                return float(loss[0])
            job = shuffled_steps(step, len(x_all), 0, device)
            job(args.warmup)
            if hasattr(rule, "inference_status"):
                rule.inference_status()  # the status of the timed steps only
            jobs[label], rules[label] = (lambda job=job: job(args.steps)), rule
        times = {k: min(v) for k, v in interleaved(jobs, args.repeats).items()}
        rows = {}
        for label, rule in rules.items():
            st = rule.inference_status() if hasattr(rule, "inference_status") else {}
            res = st.get("residual")
            rows[label] = {"ms_per_step": 1e3 * times[label] / args.steps, "vs_bp": times[label] / times["bp"],
                           "solver": getattr(rule, "mode", None), "T": getattr(rule, "steps", None),
                           "residual": None if res is None else sum(res) / len(res),
                           "energy_rose": None if not st else sum(st["energy_rose"]) / len(st["energy_rose"])}
        out["depths"][str(H)] = rows
    return out


def print_table(r: dict) -> None:
    print_header(f"PC solvers on residual MLPs (width {r['width']}, batch 128, K = 1): time per step vs BP and the "
                 "final relative residual", r)
    for H, rows in r["depths"].items():
        print(f"\ndepth H = {H}")
        print(f"{'configuration':26s} {'ms/step':>9s} {'x BP':>7s} {'residual':>10s} {'energy rose':>12s}")
        for label, e in rows.items():
            res = "-" if e["residual"] is None else f"{e['residual']:.3g}"
            rose = "-" if e["energy_rose"] is None or e["energy_rose"] != e["energy_rose"] else \
                f"{100 * e['energy_rose']:.3g}%"
            print(f"{label:26s} {e['ms_per_step']:9.2f} {e['vs_bp']:7.2f} {res:>10s} {rose:>12s}")
    print("\nresidual: mean over the timed steps of ||dF/dv|| at the end over the start of inference (sequential "
          "T = 1 keeps none); energy rose: fraction of steps in which the energy rose at some inference step.")


def main(argv=None) -> None:
    p = make_parser(__doc__)
    p.add_argument("--depths", default="8,32", help="residual net depths H (default 8,32)")
    p.add_argument("--width", type=int, default=256, help="width M (default 256)")
    add_timing_args(p, steps=40, warmup=5, repeats=3)
    add_data_args(p)
    add_device_arg(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    emit(run(args), args.json, print_table)


if __name__ == "__main__":
    main()
