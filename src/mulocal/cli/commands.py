"""Single-run commands: ``train``, ``coord``, ``derive``, ``describe``, ``data`` (``analyze``: analyze.py).

Each builds its run with ``config.assemble`` from a cell made of the generated flags (``flags.py``).
"""
from __future__ import annotations

import json
import math
import sys

from ..config import DEFAULT_LR, assemble, param_of
from ..errors import MulocalError
from ..loggers import run_name
from .flags import add_algo_options, add_compile_flag, add_fields, cell_from_args, ints, list_of, lr_value, per_algo
from .models import add_log_flag, make_loggers
from .paths import out_file
from ..progress import Work, net_cost

# coord / derive measure a few steps (without weight decay, with Adam's default eps)
NOT_FOR_CHECKS = ("epochs", "batch_size", "max_steps", "weight_decay", "weight_decay_mode", "adam_eps")


def _run_kw(args) -> dict:
    return dict(device=args.device, data_dir=args.data_dir, download=not args.no_download)


def _default_lr(args, cell) -> float:
    return args.lr if args.lr is not None else DEFAULT_LR.get(cell["optimizer"], 0.1)


# ---------------------------------------------------------------------------- train
def _inference_text(row: dict, algo=None) -> str:
    """The PC inference status of an epoch row, as text ('' for rules without one): the solver and its steps
    (``algo``: the rule that ran), whether the energy rose, the final relative residual, the guard's backtracks."""
    parts = [f"{algo.mode} T={algo.steps}"] if getattr(algo, "mode", None) and getattr(algo, "steps", None) else []
    if row.get("pc_energy_rose") is not None and row["pc_energy_rose"] == row["pc_energy_rose"]:
        parts.append(f"energy rose {100 * row['pc_energy_rose']:.3g}% of steps")
    if row.get("pc_residual") is not None:
        parts.append(f"residual {row['pc_residual']:.3g}")
    if row.get("pc_backtracks") is not None:
        parts.append(f"backtracks {row['pc_backtracks']:.3g}/step")
    return f"  [inference: {', '.join(parts)}]" if parts else ""


def _replicas(args, cell) -> tuple[list, list]:
    """The (learning rate, seed) of every replica: --lrs and --seeds paired item by item (one value of either
    goes with every value of the other), or with --cross every LR with every seed."""
    lrs = args.lr or [DEFAULT_LR.get(cell["optimizer"], 0.1)]
    seeds = args.seeds
    if args.cross:
        return [lr for lr in lrs for _ in seeds], [s for _ in lrs for s in seeds]
    K = max(len(lrs), len(seeds))
    if len(lrs) not in (1, K) or len(seeds) not in (1, K):
        raise MulocalError(f"--lrs has {len(lrs)} values and --seeds {len(seeds)}: give one, or the same number "
                           "(paired item by item), or add --cross (every LR with every seed)")
    return (lrs * K if len(lrs) == 1 else lrs), (seeds * K if len(seeds) == 1 else seeds)


def cmd_train(args) -> dict:
    from ..algos.pc import status_warning
    cell = cell_from_args(args, width=args.width)
    lrs, seeds = _replicas(args, cell)
    K = len(lrs)
    if K > 1 and not args.json:
        how = "every LR with every seed (--cross)" if args.cross else "LRs and seeds paired item by item (--cross: " \
              "every LR with every seed)"
        print(f"{K} replicas, {how}: " + ", ".join(f"lr {lr:g} seed {s}" for lr, s in zip(lrs, seeds)))
    several = len(getattr(args, "listed_algos", ())) > 1  # --algo a,b: each rule's TensorBoard folders apart
    loggers = make_loggers(args.log, run_name({**cell, "param": param_of(cell).name}),
                           subfolder=cell["algo"] if several else None)  # a missing package: before any work
    run = assemble(cell, lrs, seeds, val_fraction=args.val_fraction, progress=not args.no_progress,
                   metrics_path=args.metrics, checkpoint_path=args.checkpoint, resume=args.resume,
                   compile=args.compile, loggers=loggers, **_run_kw(args))

    def report(epoch, rows):
        if not args.json:
            for r in rows:
                acc = "diverged" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
                print(f"epoch {epoch} replica {r['replica']} lr {r['lr']:g} seed {r['seed']}: "
                      f"train loss {r['train_loss']:.4f}  test acc {acc}{_inference_text(r, run.algo)}",
                      file=sys.stderr)
                warn = status_warning(r.get("pc_energy_rose"), r.get("pc_residual"))
                if warn:
                    print(f"warning: replica {r['replica']}: {warn}", file=sys.stderr)

    res = run.trainer().run(on_epoch=report)
    reps = [{k: v for k, v in r.items() if k != "history"} for r in res["replicas"]]
    out = {"algo": cell["algo"], "param": run.param.name, "optimizer": cell["optimizer"], "width": args.width,
           "dataset": cell["dataset"], "epochs": res["epochs"], "replicas": reps}
    if cell.get("model"):
        out["model"] = cell["model"]
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
    if all(r["status"] == "diverged" for r in reps):  # failed work: exit status 1
        print(f"mulocal: {'the replica' if K == 1 else f'every replica ({K})'} diverged: try a smaller --lr",
              file=sys.stderr)
        return out, 1
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
DEPTH_CHECK_WIDTH = 128  # the depth checks' default width


def _widths(args) -> list[int]:
    return args.widths or ([DEPTH_CHECK_WIDTH] if args.depths else WIDTHS)


def _depth_check_cell(cell) -> None:
    if cell["arch"] not in ("resmlp", "rescnn"):
        raise MulocalError(f"--depths needs a residual net: add --arch resmlp (or rescnn), not {cell['arch']}")


def _cost(run, cell):
    """width, depth -> the relative cost of measuring that net (``progress.net_cost``)."""
    d_in, d_out = math.prod(run.data.input_shape), run.data.n_classes
    return lambda w, depth=None: net_cost(w, depth or cell.get("depth") or 3, d_in, d_out)


def cmd_coord(args) -> dict:
    from ..diagnostics.coord import coord_batches, coord_check

    cell, lr, run = _check_run(args)
    batches, probe = coord_batches(run.data, args.steps, args.batch_size, seed=args.seed)
    cost, label = _cost(run, cell), f"coord {cell['algo']} {run.param.name}"
    if args.depths:  # across depth, at each width
        _depth_check_cell(cell)
        checks, results = [], []
        with Work(label, [cost(w, H) for w in _widths(args) for H in args.depths], not args.no_progress) as work:
            for w in _widths(args):
                def make(H, w=w):
                    work.start(cost(w, H), f"width {w}, depth {H}")
                    return run.build_net(w, depth=H)
                res = coord_check(make, run.algo, args.depths, batches, probe, lr, cell["optimizer"],
                                  cell["momentum"], axis="depth")
                if not args.json:
                    work.write(f"width {w}:\n{res.table()}")
                checks.append({"width": w, **res.to_dict()})
                results.append(res)
        if args.plot:  # after every table
            for w, res, entry in zip(_widths(args), results, checks):
                path = args.plot if len(_widths(args)) == 1 else args.plot.replace(".png", f"-w{w}.png")
                entry["plot"] = res.plot(path, f"{cell['algo']} {run.param.name} width {w} lr={lr:g}")
        worst = max(float("inf") if c["max_abs_slope"] is None else c["max_abs_slope"] for c in checks)
        return {"algo": cell["algo"], "param": run.param.name, "optimizer": cell["optimizer"], "lr": lr,
                "axis": "depth", "checks": checks, "max_abs_slope": worst}
    with Work(label, [cost(w) for w in _widths(args)], not args.no_progress) as work:
        def make(w):
            work.start(cost(w), f"width {w}")
            return run.build_net(w)
        res = coord_check(make, run.algo, _widths(args), batches, probe, lr, cell["optimizer"], cell["momentum"])
    out = {"algo": cell["algo"], "param": run.param.name, "optimizer": cell["optimizer"], "lr": lr, **res.to_dict()}
    if not args.json:
        print(res.table())
    if args.plot:  # the table is out first: a figure that cannot be written loses no work
        out["plot"] = res.plot(args.plot, f"{cell['algo']} {run.param.name} lr={lr:g}")
        if not args.json:
            print(f"plot: {args.plot}")
    return out


def cmd_derive(args) -> dict:
    from ..diagnostics.coord import coord_batches
    from ..diagnostics.derive import derive

    cell, lr, run = _check_run(args)
    start = param_of({**cell, "param": args.start})
    batches, probe = coord_batches(run.data, args.steps, args.batch_size, seed=args.seed)
    cost, checks = _cost(run, cell), args.rounds + 1  # at most: a coordinate check per round and a final one
    label = f"derive {cell['algo']} (up to {checks} coordinate checks)"
    if args.depths:  # the depth exponents (alpha, c_H), from the start preset's depth-free branches
        from ..diagnostics.derive import derive_depth
        _depth_check_cell(cell)
        w = _widths(args)[0]
        with Work(label, [cost(w, H) for H in args.depths] * checks, not args.no_progress) as work:
            def make_deep(p, H):
                work.start(cost(w, H), f"depth {H}")
                return run.build_net(w, param=p, bias=False, depth=H)
            # the branch exponents from 0; PC's energy weights keep the run's depth rule (a property of its inference)
            begin = start.depth_free().with_(depth_gamma=run.param.depth_gamma)
            res = derive_depth(make_deep, run.algo, begin, args.depths, batches, probe, lr,
                               cell["optimizer"], rounds=args.rounds, reference=run.param)
        out = {"algo": cell["algo"], "optimizer": cell["optimizer"], "lr": lr, "width": w, "depths": args.depths,
               **res.to_dict()}
        if not args.json:
            print(res.table())
        return out

    with Work(label, [cost(w) for w in _widths(args)] * checks, not args.no_progress) as work:
        def make(param, width):  # the fitter uses bias-free networks (a bias has its own exponent)
            work.start(cost(width), f"width {width}")
            return run.build_net(width, param=param, bias=False)
        res = derive(make, run.algo, start, _widths(args), batches, probe, lr, cell["optimizer"], rounds=args.rounds,
                     reference=run.param)
    out = {"algo": cell["algo"], "optimizer": cell["optimizer"], "gamma_bar_L": cell["gamma_bar_L"], "lr": lr,
           "widths": _widths(args), **res.to_dict()}
    if not args.json:
        print(res.table())
    if args.plot:  # after the table
        out["plot"] = res.plot(args.plot, f"derive {cell['algo']} {cell['optimizer']} gbar_L={cell['gamma_bar_L']:g}")
    return out


# ---------------------------------------------------------------------------- describe / data
def cmd_describe(args) -> dict:
    cell = cell_from_args(args)
    p = param_of(cell)
    if cell.get("model"):  # a user's model: each of its tensors, as read (roles, fan-ins) and scaled
        from ..adapter import ModuleNet, load_factory
        from ..config import INPUT_SHAPES
        net = ModuleNet(load_factory(cell["model"]), INPUT_SHAPES[cell["dataset"]], args.width, p,
                        depth=args.depth or cell["depth"], spec=cell["model"])
        if not args.json:
            print(net.describe(1.0 if args.lr is None else args.lr))
        return {"parameterization": p.to_dict(), "width": args.width, "model": cell["model"],
                "tensors": net.tensor_table(1.0 if args.lr is None else args.lr)}
    if not args.json:
        print(p.describe(args.width, args.depth or 3, lr=1.0 if args.lr is None else args.lr))
        print("  lr, bias lr: " + ("multipliers of the base learning rate (give --lr to see learning rates)"
                                   if args.lr is None else f"learning rates at base learning rate {args.lr:g}"))
    return {"parameterization": p.to_dict(), "width": args.width}


def cmd_data(args) -> dict:
    from .. import datafiles as D
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
    p.add_argument("--lr", type=lr_value, default=None, help="base learning rate (default: 0.1 SGD, 1e-3 Adam)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per training step (default 64)")
    p.add_argument("--seeds", type=ints, default=None, help="seeds averaged at every width (default 0,1,2,3)")
    p.add_argument("--replicas", type=int, default=4,
                   help="or: this many seeds from --seed (default 4; the verdict's standard error, printed with it, "
                        "falls as 1/sqrt(replicas))")
    p.add_argument("--seed", type=int, default=0, help="first seed with --replicas; also the data order")
    p.add_argument("--plot", type=out_file, default=None, help="write a PNG here (after the table is printed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _run_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_fields(p, skip=NOT_FOR_CHECKS)
    add_algo_options(p)


def add_train(t) -> None:
    t.add_argument("--width", type=int, default=256, help="width of the hidden layers (CNN: channels) (default 256)")
    t.add_argument("--lrs", "--lr", dest="lr", type=list_of("lr", "lr"), default=None,
                   help="base learning rate(s), comma-separated: one replica each, paired item by item with --seeds "
                        "(default: 0.1 SGD, 1e-3 Adam)")
    t.add_argument("--seeds", type=ints, default=[0], help="seed(s), comma-separated: one replica each, paired item "
                                                           "by item with --lrs (default 0)")
    t.add_argument("--cross", action="store_true", help="train every LR of --lrs with every seed of --seeds "
                                                        "(len(lrs) x len(seeds) replicas) instead of pairing them")
    t.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of the training set")
    t.add_argument("--metrics", type=out_file, default=None, help="append per-epoch metrics as JSON lines to this file")
    t.add_argument("--checkpoint", type=out_file, default=None, help="save a checkpoint here after every epoch")
    t.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    add_log_flag(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _run_flags(t)
    add_compile_flag(t)
    t.add_argument("--json", action="store_true", help="print one JSON object")
    add_fields(t)
    add_algo_options(t)
    t.set_defaults(func=per_algo(cmd_train))


def add_coord(c) -> None:
    _check_flags(c, steps=3, steps_help="training steps measured")
    c.set_defaults(func=per_algo(cmd_coord))


def add_derive(dv) -> None:
    dv.add_argument("--start", default="sp", help="parameterization the fit starts from (default sp)")
    dv.add_argument("--rounds", type=int, default=5, help="fixed-point rounds of the fit (default 5)")
    _check_flags(dv, steps=1, steps_help="training steps measured (the fit reads the first)")
    dv.set_defaults(func=per_algo(cmd_derive))


def add_describe(d) -> None:
    d.add_argument("--width", type=int, default=256, help="the width (default 256)")
    d.add_argument("--lr", type=lr_value, default=None,
                   help="a base learning rate: the lr columns are then learning rates (default: multipliers, "
                        "the learning rates at base learning rate 1)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    add_fields(d, only=("algo", "param", "optimizer", "gamma_bar_L", "base_width", "depth", "model", "dataset"),
               run_flags=False)
    d.set_defaults(func=per_algo(cmd_describe))


def add_data(dd) -> None:
    dd.add_argument("action", choices=["fetch", "check"],
                    help="fetch: download it unless valid files are there; check: find its files and read each one")
    dd.add_argument("name", help="fashion-mnist, mnist or cifar10")
    dd.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    dd.add_argument("--json", action="store_true", help="print one JSON object")
    dd.set_defaults(func=cmd_data)


__all__ = ["add_coord", "add_data", "add_derive", "add_describe", "add_train", "cmd_coord", "cmd_data", "cmd_derive",
           "cmd_describe", "cmd_train"]
