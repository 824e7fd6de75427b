"""Command line: ``mulocal train | coord | describe | data | demo``.

Every command that produces numbers accepts ``--json`` and then prints exactly one JSON object
on stdout (progress goes to stderr). Bad input exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

from .util import json_safe
from .errors import MulocalError

DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        self.exit(2, f"mulocal: error: {message} (see `{self.prog} --help`)\n")


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and parameterization")
    g.add_argument("--algo", default="bp", help="learning rule: bp, pc, tp, dtp or gnt")
    g.add_argument("--param", default="mup", help="parameterization preset: mup, sp, ...")
    g.add_argument("--optimizer", default="sgd", help="sgd or adam")
    g.add_argument("--arch", default="mlp", help="mlp or cnn")
    g.add_argument("--depth", type=int, default=3, help="number of weight layers (default 3)")
    g.add_argument("--activation", default="tanh", help="tanh, relu or linear")
    g.add_argument("--no-bias", action="store_true", help="layers without biases")
    g.add_argument("--base-width", type=int, default=64, help="width at which every preset equals SP (default 64)")
    g.add_argument("--loss", default="ce", help="ce or mse")
    g.add_argument("--momentum", type=float, default=0.0)
    g.add_argument("--dtype", default="float32", help="float32 or float64")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    pc = p.add_argument_group("predictive coding (--algo pc)")
    pc.add_argument("--gamma-bar-L", type=float, default=0.0,
                    help="width exponent of the output energy weight: gamma_L = gamma'_L m^-gbar (muP with SGD "
                         "shifts its LR exponents by it; 0 = SGD-like, -1 = Gauss-Newton-like)")
    pc.add_argument("--gamma-L-prime", type=float, default=1.0, help="gamma'_L (default 1)")
    pc.add_argument("--inference", default=None, help="sequential (top-down, default) or parallel")
    pc.add_argument("--T", type=int, default=None, help="inference steps (default 1: single-shot)")
    pc.add_argument("--kappa", type=float, default=None, help="inference step size (default 1/gamma_l)")
    pc.add_argument("--init", default=None, help="value initialisation: forward (default), zero, random")
    pc.add_argument("--fpa", action="store_true", default=None, help="fixed prediction assumption")
    pc.add_argument("--inference-momentum", type=float, default=None)
    pc.add_argument("--tol", type=float, default=None, help="stop inference when the energy changes less")
    pc.add_argument("--incremental", action="store_true", default=None,
                    help="incremental PC: update weights at every inference step")
    tp = p.add_argument_group("target propagation (--algo tp, dtp, gnt)")
    tp.add_argument("--beta", type=float, default=None, help="output target step: t_L = f - beta dloss/df (default 1)")
    tp.add_argument("--feedback", default=None,
                    help="trainable (phi(V a + c), default), linear (V a + c), ridge (batch optimum), inverse")
    tp.add_argument("--fb-loss", default=None, help="feedback loss: rec (default), drl, ldrl")
    tp.add_argument("--sigma", type=float, default=None, help="feedback-training noise (default 0.1)")
    tp.add_argument("--fb-iters", type=int, default=None, help="feedback iterations per batch (default 1)")
    tp.add_argument("--fb-lr", type=float, default=None, help="feedback learning rate (default 0.01)")
    tp.add_argument("--fb-optimizer", default=None, help="feedback optimizer: sgd (default) or adam")
    tp.add_argument("--ridge", type=float, default=None, help="ridge constant per unit of width (default 1e-3)")
    tp.add_argument("--fb-pretrain-epochs", type=int, default=None, help="feedback-only epochs before training")
    tp.add_argument("--damping", type=float, default=None, help="GNT damping lambda (default 1e-4)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, cifar10 or synthetic")
    d.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    d.add_argument("--train-subset", type=int, default=None, help="use only this many training samples")
    d.add_argument("--no-download", action="store_true", help="never try to download the data")


def _common(args):
    """Resolve the parameterization, learning rule, dtype and dataset from parsed arguments."""

    import torch

    from .algos import make_algo
    from .data import load_dataset
    from .errors import ConfigError
    from .param import preset

    param = preset(args.param, args.optimizer, gamma_bar_L=args.gamma_bar_L, algo=args.algo,
                   base_width=args.base_width, gamma_L_prime=args.gamma_L_prime)
    algo = make_algo(args.algo, loss=args.loss, **_algo_options(args))
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if args.dtype not in dtypes:
        raise ConfigError(f"unknown dtype '{args.dtype}'; choose float32 or float64")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    data = load_dataset(args.dataset, args.data_dir, train_subset=args.train_subset,
                        val_fraction=getattr(args, "val_fraction", 0.0), seed=getattr(args, "data_seed", 0),
                        download=not args.no_download)
    return param, algo, dtypes[args.dtype], data


# flag -> (option name, learning rules that take it)
ALGO_FLAGS = {
    "T": ("T", ("pc",)), "inference": ("inference", ("pc",)), "init": ("init", ("pc",)), "fpa": ("fpa", ("pc",)),
    "kappa": ("kappa", ("pc",)), "inference_momentum": ("momentum", ("pc",)), "tol": ("tol", ("pc",)),
    "incremental": ("incremental", ("pc",)),
    "beta": ("beta", ("tp", "dtp", "gnt")), "feedback": ("feedback", ("tp", "dtp")),
    "fb_loss": ("fb_loss", ("tp", "dtp")), "sigma": ("sigma", ("tp", "dtp")), "fb_iters": ("fb_iters", ("tp", "dtp")),
    "fb_lr": ("fb_lr", ("tp", "dtp")), "fb_optimizer": ("fb_optimizer", ("tp", "dtp")),
    "ridge": ("ridge", ("tp", "dtp")), "fb_pretrain_epochs": ("pretrain_epochs", ("tp", "dtp")),
    "damping": ("damping", ("gnt",)),
}


def _algo_options(args) -> dict:
    """Options of the chosen learning rule from its flags; flags of another rule are an error."""
    opts = {}
    for flag, (name, algos) in ALGO_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if args.algo not in algos:
            raise MulocalError(f"--{flag.replace('_', '-')} applies to --algo {'/'.join(algos)} only")
        opts[name] = value
    return opts


def _net_factory(args, param, dtype, data, K, seeds, bias: bool | None = None):
    """width -> network from the model flags (``bias`` overrides --no-bias)."""
    from .nets import build
    bias = not args.no_bias if bias is None else bias
    return lambda width: build(args.arch, data.input_shape, data.n_classes, width, param, depth=args.depth,
                               activation=args.activation, bias=bias, K=K, seeds=seeds, dtype=dtype,
                               device=args.device)


# ---------------------------------------------------------------------------- commands
def cmd_train(args) -> dict:
    from .train import Trainer, TrainConfig

    param, algo, dtype, data = _common(args)
    lrs = args.lr or [DEFAULT_LR.get(args.optimizer, 0.1)]
    seeds = args.seeds
    K = max(len(lrs), len(seeds))
    if len(lrs) not in (1, K) or len(seeds) not in (1, K):
        raise MulocalError(f"--lr has {len(lrs)} values and --seeds {len(seeds)}: give one, or the same number")
    lrs, seeds = (lrs * K)[:K] if len(lrs) == 1 else lrs, (seeds * K)[:K] if len(seeds) == 1 else seeds
    net = _net_factory(args, param, dtype, data, K, seeds)(args.width)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lrs, optimizer=args.optimizer,
                      momentum=args.momentum, max_steps=args.max_steps, progress=not args.no_progress,
                      metrics_path=args.metrics, checkpoint_path=args.checkpoint, resume=args.resume)
    trainer = Trainer(net, algo, data, cfg, seeds=seeds)

    def report(epoch, rows):
        if not args.json:
            for r in rows:
                acc = "diverged" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
                print(f"epoch {epoch} replica {r['replica']} lr {r['lr']:g} seed {r['seed']}: "
                      f"train loss {r['train_loss']:.4f}  test acc {acc}", file=sys.stderr)

    res = trainer.run(on_epoch=report)
    reps = [{k: v for k, v in r.items() if k != "history"} for r in res["replicas"]]
    out = {"algo": args.algo, "param": param.name, "optimizer": args.optimizer, "width": args.width,
           "dataset": args.dataset, "epochs": res["epochs"], "replicas": reps}
    if K == 1:
        out.update(test_accuracy=reps[0]["test_accuracy"], test_loss=reps[0]["test_loss"], status=reps[0]["status"])
    else:
        out.update(test_accuracy=[r["test_accuracy"] for r in reps], status=[r["status"] for r in reps])
    if not args.json:
        for r in reps:
            acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
            print(f"replica {r['replica']} (lr {r['lr']:g}, seed {r['seed']}): {r['status']}, test accuracy {acc}")
    return out


def cmd_coord(args) -> dict:
    from .diagnostics.coord import coord_batches, coord_check

    param, algo, dtype, data = _common(args)
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.optimizer, 0.1)
    batches, probe = coord_batches(data, args.steps, args.batch_size, seed=args.seed)
    make = _net_factory(args, param, dtype, data, args.replicas, range(args.seed, args.seed + args.replicas))
    res = coord_check(make, algo, args.widths, batches, probe, lr, args.optimizer, args.momentum)
    out = {"algo": args.algo, "param": param.name, "optimizer": args.optimizer, "lr": lr, **res.to_dict()}
    if args.plot:
        out["plot"] = res.plot(args.plot, f"{args.algo} {param.name} lr={lr:g}")
    if not args.json:
        print(res.table())
        if args.plot:
            print(f"plot: {args.plot}")
    return out


def cmd_derive(args) -> dict:
    from .diagnostics.coord import coord_batches
    from .diagnostics.derive import derive
    from .param import preset

    ref, algo, dtype, data = _common(args)
    start = preset(args.start, args.optimizer, gamma_bar_L=args.gamma_bar_L, algo=args.algo,
                   base_width=args.base_width, gamma_L_prime=args.gamma_L_prime)
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.optimizer, 0.1)
    batches, probe = coord_batches(data, args.steps, args.batch_size, seed=args.seed)
    seeds = range(args.seed, args.seed + args.replicas)

    def make(param, width):  # the fitter uses bias-free networks (a bias has its own exponent)
        return _net_factory(args, param, dtype, data, args.replicas, seeds, bias=False)(width)
    res = derive(make, algo, start, args.widths, batches, probe, lr, args.optimizer, rounds=args.rounds,
                 reference=ref)
    out = {"algo": args.algo, "optimizer": args.optimizer, "gamma_bar_L": args.gamma_bar_L, "lr": lr,
           "widths": args.widths, **res.to_dict()}
    if args.plot:
        out["plot"] = res.plot(args.plot, f"derive {args.algo} {args.optimizer} gbar_L={args.gamma_bar_L:g}")
    if not args.json:
        print(res.table())
    return out


def cmd_analyze(args) -> dict:
    from .diagnostics import align
    widths = args.widths
    if args.what == "linear":
        gbars = args.gamma_bars or [-1.0, 0.0, 1.0]
        res = align.preconditioner_vs_width(widths, gbars, base_width=args.base_width)
        if args.plot:
            res["plot"] = align.plot_lines(args.plot, widths, {f"gbar_L = {g}": v for g, v in res["norms"].items()},
                                           "width", "||C|| (spectral norm)", "deep-linear PC preconditioner",
                                           logy=True)
        if not args.json:
            for g, v in res["norms"].items():
                print(f"gbar_L = {g:>5}: " + "  ".join(f"{w}: {n:.4g}" for w, n in zip(widths, v)))
        return res
    from .data import load_dataset
    from .diagnostics.coord import coord_batches
    data = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    if args.what == "cosine":
        x = data.x_train[:args.batch_size].double().flatten(1)
        y = data.y_train[:args.batch_size]
        res = align.cosine_vs_width(widths, x, y, activation=args.activation, gamma_bar_L=args.gamma_bar_L,
                                    base_width=args.base_width, seeds=tuple(range(args.replicas)))
        if args.plot:
            series = {f"{m} layer {l + 1}": [row[l] for row in v["cos_bp"]]
                      for m, v in res["modes"].items() for l in range(len(v["cos_bp"][0]))}
            res["plot"] = align.plot_lines(args.plot, widths, series, "width", "cosine with BP",
                                           f"{args.activation}, gbar_L = {args.gamma_bar_L:g}")
        if not args.json:
            for m, v in res["modes"].items():
                print(f"{m}: cosine with BP per layer")
                for w, row in zip(widths, v["cos_bp"]):
                    print(f"  width {w:>5}: " + "  ".join(f"{c:.4f}" for c in row))
        return res
    batches, probe = coord_batches(data, args.steps, 64)
    configs = [(a, "mup") for a in args.algos.split(",")]
    res = align.alignment_vs_step(configs, widths, batches, probe, lr=args.lr, K=args.replicas)
    if args.plot:
        res["plot"] = align.plot_lines(args.plot, list(range(1, args.steps + 1)),
                                       {k: v["omega"] for k, v in res["configs"].items()}, "step",
                                       "omega_L", "alignment exponent of W_L Delta h_{L-1}", logx=False)
    if not args.json:
        for k, v in res["configs"].items():
            print(f"{k:<24} omega_L per step: " + " ".join(f"{o:.2f}" for o in v["omega"]))
    return res


def cmd_describe(args) -> dict:
    from .param import preset
    p = preset(args.param, args.optimizer, gamma_bar_L=args.gamma_bar_L, algo=args.algo, base_width=args.base_width)
    if not args.json:
        print(p.describe(args.width, args.depth, lr=args.lr))
    return {"parameterization": p.to_dict(), "width": args.width}


def cmd_data(args) -> dict:
    from . import data as D
    if args.action == "fetch":
        path = D.fetch(args.name, args.data_dir)
        out = {"name": args.name, "dir": str(path), "ok": True}
    else:
        out = D.check(args.name, args.data_dir)
    if not args.json:
        print(json.dumps(out, indent=1))
    return out


def cmd_reproduce(args) -> dict:
    from .reproduce import run
    return run(args.name, args.budget, args.out, args.device, args.data_dir, args.workers, json_mode=args.json)


def cmd_demo(args) -> dict:
    from .demo import run_demo
    return run_demo(out_dir=args.out, quick=args.quick, data_dir=args.data_dir, json_mode=args.json)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mulocal", description="Width-stable local learning: muP for PC and TP, muTransfer.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser("train", help="train one model (or K replicas) and evaluate it")
    _add_model_args(t)
    t.add_argument("--width", type=int, default=256)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=_floats, default=None,
                   help="base learning rate(s), comma-separated: one replica each (default: 0.1 SGD, 1e-3 Adam)")
    t.add_argument("--seeds", type=_ints, default=[0], help="seed(s), comma-separated: one replica each")
    t.add_argument("--val-fraction", type=float, default=0.0)
    t.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    t.add_argument("--metrics", default=None, help="append per-epoch metrics as JSON lines to this file")
    t.add_argument("--checkpoint", default=None, help="save a checkpoint here after every epoch")
    t.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("coord", help="coordinate check: per-layer update sizes vs width, fitted slopes")
    _add_model_args(c)
    c.add_argument("--widths", type=_ints, default=[64, 128, 256, 512, 1024])
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("--lr", type=float, default=None)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--replicas", type=int, default=4, help="seeds averaged at every width")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--plot", default=None, help="write a PNG here")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_coord)

    dv = sub.add_parser("derive", help="fit the width exponents (b_L, c) that make every update Theta(1)")
    _add_model_args(dv)
    dv.add_argument("--start", default="sp", help="parameterization the fit starts from (default sp)")
    dv.add_argument("--widths", type=_ints, default=[64, 128, 256, 512, 1024])
    dv.add_argument("--steps", type=int, default=1, help="training steps measured (the fit reads the first)")
    dv.add_argument("--rounds", type=int, default=5)
    dv.add_argument("--lr", type=float, default=None)
    dv.add_argument("--batch-size", type=int, default=64)
    dv.add_argument("--replicas", type=int, default=4)
    dv.add_argument("--seed", type=int, default=0)
    dv.add_argument("--plot", default=None)
    dv.add_argument("--json", action="store_true")
    dv.set_defaults(func=cmd_derive)

    an = sub.add_parser("analyze", help="cosine to BP vs width, alignment exponents, deep-linear ||C||")
    an.add_argument("what", choices=["cosine", "alignment", "linear"])
    an.add_argument("--widths", type=_ints, default=[64, 128, 256, 512, 1024, 2048])
    an.add_argument("--activation", default="linear", help="cosine: linear or tanh")
    an.add_argument("--gamma-bar-L", type=float, default=0.0)
    an.add_argument("--gamma-bars", type=_floats, default=None, help="linear: gbar_L values (default -1,0,1)")
    an.add_argument("--algos", default="bp,tp,dtp", help="alignment: learning rules (each under its muP)")
    an.add_argument("--steps", type=int, default=10, help="alignment: training steps")
    an.add_argument("--lr", type=float, default=0.1)
    an.add_argument("--batch-size", type=int, default=32, help="cosine: batch size")
    an.add_argument("--replicas", type=int, default=3)
    an.add_argument("--base-width", type=int, default=64)
    an.add_argument("--dataset", default="fashion-mnist")
    an.add_argument("--data-dir", default=None)
    an.add_argument("--no-download", action="store_true")
    an.add_argument("--plot", default=None)
    an.add_argument("--json", action="store_true")
    an.set_defaults(func=cmd_analyze)

    d = sub.add_parser("describe", help="print what a preset resolves to at a width")
    d.add_argument("--param", default="mup")
    d.add_argument("--optimizer", default="sgd")
    d.add_argument("--algo", default="bp", help="the learning rule whose muP to show (bp, pc, tp, dtp, gnt)")
    d.add_argument("--gamma-bar-L", type=float, default=0.0)
    d.add_argument("--width", type=int, default=256)
    d.add_argument("--depth", type=int, default=3)
    d.add_argument("--base-width", type=int, default=64)
    d.add_argument("--lr", type=float, default=1.0)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_describe)

    dd = sub.add_parser("data", help="fetch or check a dataset")
    dd.add_argument("action", choices=["fetch", "check"])
    dd.add_argument("name", help="fashion-mnist, mnist or cifar10")
    dd.add_argument("--data-dir", default=None)
    dd.add_argument("--json", action="store_true")
    dd.set_defaults(func=cmd_data)

    from .sweep import register_cli
    register_cli(sub)

    r = sub.add_parser("reproduce", help="reproduce a figure of the paper: fig1-left, fig1-right, fig3, fig7, fig8, "
                                         "cnn, table1")
    r.add_argument("name")
    r.add_argument("--budget", default="small", help="small (about 20 min on 2 CPU cores) or paper (GPU)")
    r.add_argument("--out", default="runs/reproduce")
    r.add_argument("--device", default="cpu")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--workers", type=int, default=None, help="sweep processes (default one per core)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_reproduce)

    m = sub.add_parser("demo", help="the muTransfer demo on FashionMNIST: muP keeps the best LR, SP moves it")
    m.add_argument("--out", default="runs/demo", help="folder for the plot and results")
    m.add_argument("--quick", action="store_true", help="a smaller, faster version")
    m.add_argument("--data-dir", default=None)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_demo)
    return p




def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    for key in ("width", "steps", "epochs", "batch_size", "replicas", "depth", "base_width", "rounds"):
        v = getattr(args, key, None)
        if v is not None and v <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {v}")
    for w in getattr(args, "widths", None) or []:
        if w <= 0:
            parser.error(f"--widths must be positive, got {w}")
    return dispatch(args)


def dispatch(args) -> int:
    """Run a parsed command: one error line and status 2 for bad input, one JSON object with --json."""
    try:
        out = args.func(args)
    except MulocalError as err:
        print(f"mulocal: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mulocal: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(json_safe(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
