"""Single-run commands: ``train``, ``coord``, ``derive``, ``describe``, ``analyze``, ``data``.

Each builds its run with ``config.assemble`` from a cell made of the generated flags (``flags.py``).
"""
from __future__ import annotations

import json
import sys

from ..algos.pc import status_warning
from ..config import DEFAULT_LR, assemble, param_of
from ..errors import MulocalError
from ..param import BASE_WIDTH
from ..util import rule_label
from .flags import (add_algo_options, add_compile_flag, add_fields, algo_options_from_args, cell_from_args, floats,
                    given_algo_options, ints, out_file, per_algo)

NOT_FOR_CHECKS = ("epochs", "batch_size", "max_steps", "weight_decay")  # coord / derive measure a few steps


def _run_kw(args) -> dict:
    return dict(device=args.device, data_dir=args.data_dir, download=not args.no_download)


def _default_lr(args, cell) -> float:
    return args.lr if args.lr is not None else DEFAULT_LR.get(cell["optimizer"], 0.1)


# ---------------------------------------------------------------------------- train
def _inference_text(row: dict) -> str:
    """The PC inference status of an epoch row, as text ('' for rules without one)."""
    parts = []
    if row.get("pc_energy_rose") is not None and row["pc_energy_rose"] == row["pc_energy_rose"]:
        parts.append(f"energy rose {100 * row['pc_energy_rose']:.3g}% of steps")
    if row.get("pc_residual") is not None:
        parts.append(f"residual {row['pc_residual']:.3g}")
    if row.get("pc_backtracks") is not None:
        parts.append(f"backtracks {row['pc_backtracks']:.3g}/step")
    return f"  [inference: {', '.join(parts)}]" if parts else ""


def cmd_train(args) -> dict:
    cell = cell_from_args(args, width=args.width)
    lrs = args.lr or [DEFAULT_LR.get(cell["optimizer"], 0.1)]
    seeds = args.seeds
    K = max(len(lrs), len(seeds))
    if len(lrs) not in (1, K) or len(seeds) not in (1, K):
        raise MulocalError(f"--lr has {len(lrs)} values and --seeds {len(seeds)}: give one, or the same number")
    lrs, seeds = (lrs * K)[:K] if len(lrs) == 1 else lrs, (seeds * K)[:K] if len(seeds) == 1 else seeds
    run = assemble(cell, lrs, seeds, val_fraction=args.val_fraction, progress=not args.no_progress,
                   metrics_path=args.metrics, checkpoint_path=args.checkpoint, resume=args.resume,
                   compile=args.compile, **_run_kw(args))

    def report(epoch, rows):
        if not args.json:
            for r in rows:
                acc = "diverged" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
                print(f"epoch {epoch} replica {r['replica']} lr {r['lr']:g} seed {r['seed']}: "
                      f"train loss {r['train_loss']:.4f}  test acc {acc}{_inference_text(r)}", file=sys.stderr)
                warn = status_warning(r.get("pc_energy_rose"), r.get("pc_residual"))
                if warn:
                    print(f"warning: replica {r['replica']}: {warn}", file=sys.stderr)

    res = run.trainer().run(on_epoch=report)
    reps = [{k: v for k, v in r.items() if k != "history"} for r in res["replicas"]]
    out = {"algo": cell["algo"], "param": run.param.name, "optimizer": cell["optimizer"], "width": args.width,
           "dataset": cell["dataset"], "epochs": res["epochs"], "replicas": reps}
    if args.compile != "off":  # what was compiled, or why it ran eagerly
        out["compile"] = res["compile"]
    if K == 1:
        out.update(test_accuracy=reps[0]["test_accuracy"], test_loss=reps[0]["test_loss"], status=reps[0]["status"])
    else:
        out.update(test_accuracy=[r["test_accuracy"] for r in reps], status=[r["status"] for r in reps])
    if not args.json:
        for r in reps:
            acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
            inf = r.get("inference", {})
            warn = status_warning(inf.get("energy_rose"), inf.get("residual"))
            print(f"replica {r['replica']} (lr {r['lr']:g}, seed {r['seed']}): {r['status']}, test accuracy {acc}"
                  + (f"  warning: {warn}" if warn else ""))
    return out


# ---------------------------------------------------------------------------- coord / derive
def _check_run(args):
    """The cell, learning rate and assembled run of a coordinate check (no net yet: one per width)."""
    cell = cell_from_args(args)
    lr = _default_lr(args, cell)
    seeds = args.seeds or list(range(args.seed, args.seed + args.replicas))
    run = assemble(cell, [lr] * len(seeds), seeds, **_run_kw(args))
    return cell, lr, run


WIDTHS = [64, 128, 256, 512, 1024]  # the width checks' default widths
WIDTHS_ANALYZE = [64, 128, 256, 512, 1024, 2048]
DEPTH_CHECK_WIDTH = 128  # the depth checks' default width


def _widths(args) -> list[int]:
    return args.widths or ([DEPTH_CHECK_WIDTH] if args.depths else WIDTHS)


def _depth_check_cell(cell) -> None:
    if cell["arch"] not in ("resmlp", "rescnn"):
        raise MulocalError(f"--depths needs a residual net: add --arch resmlp (or rescnn), not {cell['arch']}")


def cmd_coord(args) -> dict:
    from ..diagnostics.coord import coord_batches, coord_check

    cell, lr, run = _check_run(args)
    batches, probe = coord_batches(run.data, args.steps, args.batch_size, seed=args.seed)
    if args.depths:  # across depth, at each width
        _depth_check_cell(cell)
        checks = []
        for w in _widths(args):
            res = coord_check(lambda H: run.build_net(w, depth=H), run.algo, args.depths, batches, probe, lr,
                              cell["optimizer"], cell["momentum"], axis="depth")
            entry = {"width": w, **res.to_dict()}
            if args.plot:
                path = args.plot if len(_widths(args)) == 1 else args.plot.replace(".png", f"-w{w}.png")
                entry["plot"] = res.plot(path, f"{cell['algo']} {run.param.name} width {w} lr={lr:g}")
            if not args.json:
                print(f"width {w}:\n{res.table()}")
            checks.append(entry)
        worst = max(float("inf") if c["max_abs_slope"] is None else c["max_abs_slope"] for c in checks)
        return {"algo": cell["algo"], "param": run.param.name, "optimizer": cell["optimizer"], "lr": lr,
                "axis": "depth", "checks": checks, "max_abs_slope": worst}
    res = coord_check(run.build_net, run.algo, _widths(args), batches, probe, lr, cell["optimizer"],
                      cell["momentum"])
    out = {"algo": cell["algo"], "param": run.param.name, "optimizer": cell["optimizer"], "lr": lr, **res.to_dict()}
    if args.plot:
        out["plot"] = res.plot(args.plot, f"{cell['algo']} {run.param.name} lr={lr:g}")
    if not args.json:
        print(res.table())
        if args.plot:
            print(f"plot: {args.plot}")
    return out


def cmd_derive(args) -> dict:
    from ..diagnostics.coord import coord_batches
    from ..diagnostics.derive import derive

    cell, lr, run = _check_run(args)
    start = param_of({**cell, "param": args.start})
    batches, probe = coord_batches(run.data, args.steps, args.batch_size, seed=args.seed)
    if args.depths:  # the depth exponents (alpha, c_H), from the start preset's depth-free version
        from ..diagnostics.derive import derive_depth
        _depth_check_cell(cell)
        w = _widths(args)[0]
        res = derive_depth(lambda p, H: run.build_net(w, param=p, bias=False, depth=H), run.algo,
                           start.depth_free(), args.depths, batches, probe, lr, cell["optimizer"],
                           rounds=args.rounds, reference=run.param)
        out = {"algo": cell["algo"], "optimizer": cell["optimizer"], "lr": lr, "width": w, "depths": args.depths,
               **res.to_dict()}
        if not args.json:
            print(res.table())
        return out

    def make(param, width):  # the fitter uses bias-free networks (a bias has its own exponent)
        return run.build_net(width, param=param, bias=False)
    res = derive(make, run.algo, start, _widths(args), batches, probe, lr, cell["optimizer"], rounds=args.rounds,
                 reference=run.param)
    out = {"algo": cell["algo"], "optimizer": cell["optimizer"], "gamma_bar_L": cell["gamma_bar_L"], "lr": lr,
           "widths": _widths(args), **res.to_dict()}
    if args.plot:
        out["plot"] = res.plot(args.plot, f"derive {cell['algo']} {cell['optimizer']} gbar_L={cell['gamma_bar_L']:g}")
    if not args.json:
        print(res.table())
    return out


# ---------------------------------------------------------------------------- analyze / describe / data
def cmd_analyze(args) -> dict:
    from ..diagnostics import align
    from ..plots import plot_lines
    given = given_algo_options(args)
    if given and args.what not in ("layers", "features"):
        raise MulocalError(f"{', '.join(given)}: rule options apply to analyze layers and features only")
    if args.what != "layers":  # layers reads one width, default DEPTH_CHECK_WIDTH
        args.widths = args.widths or WIDTHS_ANALYZE
    widths = args.widths
    if args.what == "linear":
        gbars = args.gamma_bars or [-1.0, 0.0, 1.0]
        res = align.preconditioner_vs_width(widths, gbars, base_width=args.base_width)
        if args.plot:
            res["plot"] = plot_lines(args.plot, widths, {f"gbar_L = {g}": v for g, v in res["norms"].items()},
                                           "width", "||C|| (spectral norm)", "deep-linear PC preconditioner",
                                           logy=True)
        if not args.json:
            print("spectral norm ||C|| of the deep-linear PC preconditioner, per width")
            print(f"{'gbar_L':>8}" + "".join(f"{w:>11}" for w in widths))
            for g, v in res["norms"].items():
                print(f"{g:>8}" + "".join(f"{n:>11.4g}" for n in v))
        return res
    from ..data import load_dataset
    from ..diagnostics.coord import coord_batches
    data = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    if args.what == "cosine":
        x = data.x_train[:args.batch_size].double().flatten(1)
        y = data.y_train[:args.batch_size]
        res = align.cosine_vs_width(widths, x, y, activation=args.activation, gamma_bar_L=args.gamma_bar_L,
                                    base_width=args.base_width, seeds=tuple(range(args.replicas)))
        if args.plot:
            series = {f"{m} layer {l + 1}": [row[l] for row in v["cos_bp"]]
                      for m, v in res["modes"].items() for l in range(len(v["cos_bp"][0]))}
            res["plot"] = plot_lines(args.plot, widths, series, "width", "cosine with BP",
                                           f"{args.activation}, gbar_L = {args.gamma_bar_L:g}")
        if not args.json:
            for m, v in res["modes"].items():
                print(f"{m}: cosine of each layer's weight update with BP's (mean over seeds)")
                print(f"  {'width':>6}" + "".join(f"{'layer ' + str(l + 1):>10}" for l in range(len(v["cos_bp"][0]))))
                for w, row in zip(widths, v["cos_bp"]):
                    print(f"  {w:>6}" + "".join(f"{c:>10.4f}" for c in row))
        return res
    if args.what == "features":
        return _features(args, data)
    if args.what == "layers":
        return _layers(args, data)
    batches, probe = coord_batches(data, args.steps, 64)
    configs = [(a, "mup") for a in args.algos.split(",")]
    res = align.alignment_vs_step(configs, widths, batches, probe, lr=args.lr, K=args.replicas)
    if args.plot:
        res["plot"] = plot_lines(args.plot, list(range(1, args.steps + 1)),
                                       {k: v["omega"] for k, v in res["configs"].items()}, "step",
                                       "omega_L", "alignment exponent of W_L Delta h_{L-1}", logx=False)
    if not args.json:
        print("alignment exponent omega_L of W_L Delta h_(L-1), fitted across widths, per training step")
        print(f"{'config':<24}" + "".join(f"{'step ' + str(t + 1):>8}" for t in range(args.steps)))
        for k, v in res["configs"].items():
            print(f"{k:<24}" + "".join(f"{o:>8.2f}" for o in v["omega"]))
    return res


def _layers(args, data) -> dict:
    """analyze layers: every layer's relative update after training, per rule (diagnostics/layers.py)."""
    from ..algos import make_algo
    from ..diagnostics.coord import coord_batches
    from ..diagnostics.layers import layer_changes
    from ..nets import build
    from ..param import preset
    from ..plots import layers_figure
    batches, probe = coord_batches(data, args.steps, 64)
    width = args.widths[0] if args.widths else DEPTH_CHECK_WIDTH
    out = {"arch": args.arch, "depth": args.depth, "width": width, "steps": args.steps, "lrs": {}, "configs": {}}
    algos = args.algos.split(",")
    lrs = dict(zip(algos, args.lrs)) if args.lrs else {}
    for algo in algos:
        p = preset(args.params.split(",")[0], "sgd", algo=algo)
        lr = lrs.get(algo, args.lr)
        net = build(args.arch, data.input_shape, data.n_classes, width, p, depth=args.depth, K=args.replicas,
                    seeds=range(args.replicas))
        opts = algo_options_from_args(args, algo, algos)
        res = layer_changes(net, make_algo(algo, **opts), batches, probe, lr)
        key = rule_label(algo, p.name, opts)
        out["configs"][key], out["lrs"][key] = res.to_dict(), lr
        if not args.json:
            print(f"== {key} (lr {lr:g}, {args.arch} depth {args.depth}, width {width}, {args.steps} steps)")
            print(res.table(every=max(1, args.depth // 8)))
    if args.plot:
        out["plot"] = layers_figure(out["configs"], args.plot, f"relative update per layer: {args.arch} depth "
                                    f"{args.depth}, width {width}, {args.steps} SGD steps")
    return out


def _features(args, data) -> dict:
    """analyze features: per-layer feature learning vs width for each rule x preset (diagnostics/features.py)."""
    from ..algos import make_algo
    from ..diagnostics.coord import coord_batches
    from ..diagnostics.features import feature_learning
    from ..nets import build
    from ..param import preset
    from ..plots import features_figure
    batches, probe = coord_batches(data, args.steps, 64)
    out = {"widths": args.widths, "steps": args.steps, "lr": args.lr, "configs": {}}
    algos = args.algos.split(",")
    for algo in algos:
        opts = algo_options_from_args(args, algo, algos)
        for pname in args.params.split(","):
            p = preset(pname, "sgd", algo=algo)
            res = feature_learning(lambda w: build("mlp", data.input_shape, data.n_classes, w, p, K=args.replicas,
                                                   seeds=range(args.replicas)),
                                   make_algo(algo, **opts), args.widths, batches, probe, args.lr)
            key = rule_label(algo, p.name, opts)
            out["configs"][key] = res.to_dict()
            if not args.json:
                print(f"== {key}")
                print(res.table())
    if args.plot:
        out["plot"] = features_figure(out["configs"], args.plot, f"feature learning vs width after {args.steps} "
                                      f"SGD steps, lr {args.lr:g}")
    return out


def cmd_describe(args) -> dict:
    p = param_of(cell_from_args(args))
    if not args.json:
        print(p.describe(args.width, args.depth or 3, lr=args.lr))
    return {"parameterization": p.to_dict(), "width": args.width}


def cmd_data(args) -> dict:
    from .. import data as D
    if args.action == "fetch":
        path = D.fetch(args.name, args.data_dir)
        out = {"name": args.name, "dir": str(path), "ok": True}
    else:
        out = D.check(args.name, args.data_dir)
    if not args.json:
        print(json.dumps(out, indent=1))
    return out, (0 if out.get("ok") else 1)  # run.sh relies on the status


# ---------------------------------------------------------------------------- parsers
def _run_flags(p) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _check_flags(p, steps: int, steps_help: str) -> None:
    """The flags of the width checks (coord, derive): a few steps at several widths, seeds averaged."""
    p.add_argument("--widths", type=ints, default=None, help="widths (default 64..1024; with --depths 128)")
    p.add_argument("--depths", type=ints, default=None,
                   help="check across depth instead (residual nets: --arch resmlp/rescnn), e.g. 4,8,16,32,64")
    p.add_argument("--steps", type=int, default=steps, help=f"{steps_help} (default {steps})")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: 0.1 SGD, 1e-3 Adam)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=ints, default=None, help="seeds averaged at every width (default 0,1,2,3)")
    p.add_argument("--replicas", type=int, default=4, help="or: this many seeds from --seed (default 4)")
    p.add_argument("--seed", type=int, default=0, help="first seed with --replicas; also the data order")
    p.add_argument("--plot", type=out_file, default=None, help="write a PNG here")
    _run_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_fields(p, skip=NOT_FOR_CHECKS)
    add_algo_options(p)


def register(sub) -> None:
    t = sub.add_parser("train", help="train one model (or K replicas) and evaluate it")
    t.add_argument("--width", type=int, default=256, help="width of the hidden layers (CNN: channels) (default 256)")
    t.add_argument("--lrs", "--lr", dest="lr", type=floats, default=None,
                   help="base learning rate(s), comma-separated: one replica each (default: 0.1 SGD, 1e-3 Adam)")
    t.add_argument("--seeds", type=ints, default=[0], help="seed(s), comma-separated: one replica each")
    t.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of the training set")
    t.add_argument("--metrics", type=out_file, default=None, help="append per-epoch metrics as JSON lines to this file")
    t.add_argument("--checkpoint", type=out_file, default=None, help="save a checkpoint here after every epoch")
    t.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _run_flags(t)
    add_compile_flag(t)
    t.add_argument("--json", action="store_true", help="print one JSON object")
    add_fields(t)
    add_algo_options(t)
    t.set_defaults(func=per_algo(cmd_train))

    c = sub.add_parser("coord", help="coordinate check: per-layer update sizes vs width, fitted slopes")
    _check_flags(c, steps=3, steps_help="training steps measured")
    c.set_defaults(func=per_algo(cmd_coord))

    dv = sub.add_parser("derive", help="fit the width exponents (b_L, c) that make every update Theta(1)")
    dv.add_argument("--start", default="sp", help="parameterization the fit starts from (default sp)")
    dv.add_argument("--rounds", type=int, default=5, help="fixed-point rounds of the fit (default 5)")
    _check_flags(dv, steps=1, steps_help="training steps measured (the fit reads the first)")
    dv.set_defaults(func=per_algo(cmd_derive))

    an = sub.add_parser("analyze", help="cosine to BP vs width, alignment exponents, deep-linear ||C||, per-layer "
                                        "feature learning, every layer's relative update (layers)")
    an.add_argument("what", choices=["cosine", "alignment", "linear", "features", "layers"])
    an.add_argument("--widths", type=ints, default=None, help="widths (default 64..2048; layers: the first, default 128)")
    an.add_argument("--arch", default="resmlp", choices=("mlp", "resmlp"), help="layers: the net (default resmlp)")
    an.add_argument("--depth", type=int, default=16, help="layers: number of weight layers (default 16)")
    an.add_argument("--lrs", type=floats, default=None, help="layers: one learning rate per rule of --algos")
    an.add_argument("--activation", default="linear", help="cosine: linear or tanh")
    an.add_argument("--gamma-bar-L", type=float, default=0.0, help="cosine: PC's output energy exponent")
    an.add_argument("--gamma-bars", type=floats, default=None, help="linear: gbar_L values (default -1,0,1)")
    an.add_argument("--algo", "--algos", dest="algos", default="bp,tp,dtp",
                    help="alignment, features: learning rules, comma-separated (alignment: each under its muP)")
    an.add_argument("--params", default="mup", help="features: presets, comma-separated (e.g. mup,mup-bL1,sp)")
    an.add_argument("--steps", type=int, default=10, help="alignment, features: training steps")
    an.add_argument("--lr", type=float, default=0.1)
    an.add_argument("--batch-size", type=int, default=32, help="cosine: batch size")
    an.add_argument("--replicas", type=int, default=3)
    an.add_argument("--base-width", type=int, default=BASE_WIDTH)
    an.add_argument("--dataset", default="fashion-mnist")
    an.add_argument("--data-dir", default=None)
    an.add_argument("--no-download", action="store_true")
    an.add_argument("--plot", type=out_file, default=None, help="write a PNG here")
    an.add_argument("--json", action="store_true")
    add_algo_options(an)  # layers, features: the rules' options (e.g. --kappa 1 for PC)
    an.set_defaults(func=cmd_analyze)

    d = sub.add_parser("describe", help="print what a preset resolves to at a width")
    d.add_argument("--width", type=int, default=256)
    d.add_argument("--lr", type=float, default=1.0, help="base learning rate the table multiplies")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    add_fields(d, only=("algo", "param", "optimizer", "gamma_bar_L", "base_width", "depth"), run_flags=False)
    d.set_defaults(func=per_algo(cmd_describe))

    dd = sub.add_parser("data", help="fetch or check a dataset")
    dd.add_argument("action", choices=["fetch", "check"])
    dd.add_argument("name", help="fashion-mnist, mnist or cifar10")
    dd.add_argument("--data-dir", default=None)
    dd.add_argument("--json", action="store_true")
    dd.set_defaults(func=cmd_data)


__all__ = ["register", "cmd_train", "cmd_coord", "cmd_derive", "cmd_analyze", "cmd_describe", "cmd_data"]
