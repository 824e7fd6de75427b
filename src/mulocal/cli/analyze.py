"""``mulocal analyze MODE``: the analyses behind the paper's figures, one mode each with its own flags
(``mulocal analyze cosine --help`` shows cosine's only).

* ``linear``: the deep-linear PC preconditioner's spectral norm vs width;
* ``cosine``: the cosine of PC's and GNT's weight updates with BP's, per layer, vs width;
* ``alignment``: the alignment exponent omega_L of W_L Delta h_(L-1) per training step;
* ``features``: per-layer feature learning vs width for each rule x preset;
* ``layers``: every layer's relative update after training, per rule.

Every mode prints its table before it writes ``--plot``.
"""
from __future__ import annotations

import argparse

from ..errors import MulocalError
from ..param import BASE_WIDTH
from ..util import rule_label
from .commands import DEPTH_CHECK_WIDTH  # layers: the default width, as the depth checks'
from .flags import add_algo_options, algo_options_from_args, given_algo_options, ints, list_of, lr_value
from .paths import out_file
from ..progress import Work, net_cost

WIDTHS_ANALYZE = [64, 128, 256, 512, 1024, 2048]

MODES = {
    "linear": "spectral norm of the deep-linear PC preconditioner ||C|| vs width, per gbar_L",
    "cosine": "cosine of each layer's PC and GNT weight update with BP's, vs width",
    "alignment": "alignment exponent omega_L of W_L Delta h_(L-1), fitted across widths, per training step",
    "features": "feature learning vs width after a few SGD steps, per rule x preset",
    "layers": "every layer's relative weight update after a few SGD steps, per rule (deep residual nets)",
}


def cmd_analyze(args) -> dict:
    given = given_algo_options(args)
    if given and args.what not in ("layers", "features"):
        raise MulocalError(f"{', '.join(given)}: rule options apply to analyze layers and features only")
    widths = args.widths = args.widths or (None if args.what == "layers" else WIDTHS_ANALYZE)
    if args.what == "linear":
        return _linear(args, widths)
    from ..data import load_dataset
    data = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    return {"cosine": _cosine, "alignment": _alignment, "features": _features, "layers": _layers}[args.what](args, data)


def _linear(args, widths) -> dict:
    from ..diagnostics import align
    gbars = args.gamma_bars or [-1.0, 0.0, 1.0]
    res = align.preconditioner_vs_width(widths, gbars, base_width=args.base_width)
    if not args.json:
        print("spectral norm ||C|| of the deep-linear PC preconditioner, per width")
        print(f"{'gbar_L':>8}" + "".join(f"{w:>11}" for w in widths))
        for g, v in res["norms"].items():
            print(f"{g:>8}" + "".join(f"{n:>11.4g}" for n in v))
    if args.plot:
        from ..plots import plot_lines
        res["plot"] = plot_lines(args.plot, widths, {f"gbar_L = {g}": v for g, v in res["norms"].items()},
                                 "width", "||C|| (spectral norm)", "deep-linear PC preconditioner", logy=True)
    return res


def _cosine(args, data) -> dict:
    from ..diagnostics import align
    widths = args.widths
    x = data.x_train[:args.batch_size].double().flatten(1)
    y = data.y_train[:args.batch_size]
    res = align.cosine_vs_width(widths, x, y, activation=args.activation, gamma_bar_L=args.gamma_bar_L,
                                base_width=args.base_width, seeds=tuple(range(args.replicas)))
    if not args.json:
        for m, v in res["modes"].items():
            print(f"{m}: cosine of each layer's weight update with BP's (mean over seeds)")
            print(f"  {'width':>6}" + "".join(f"{'layer ' + str(l + 1):>10}" for l in range(len(v["cos_bp"][0]))))
            for w, row in zip(widths, v["cos_bp"]):
                print(f"  {w:>6}" + "".join(f"{c:>10.4f}" for c in row))
    if args.plot:
        from ..plots import plot_lines
        series = {f"{m} layer {l + 1}": [row[l] for row in v["cos_bp"]]
                  for m, v in res["modes"].items() for l in range(len(v["cos_bp"][0]))}
        res["plot"] = plot_lines(args.plot, widths, series, "width", "cosine with BP",
                                 f"{args.activation}, gbar_L = {args.gamma_bar_L:g}")
    return res


def _alignment(args, data) -> dict:
    from ..diagnostics import align
    from ..diagnostics.coord import coord_batches
    batches, probe = coord_batches(data, args.steps, 64)
    configs = [(a, "mup") for a in args.algos.split(",")]
    res = {"configs": {}}
    with Work("analyze alignment", [1.0] * len(configs)) as work:  # a rule at a time: the bar names it
        for config in configs:
            work.start(1.0, f"--algo {config[0]}")
            one = align.alignment_vs_step([config], args.widths, batches, probe, lr=args.lr, K=args.replicas)
            res = dict(one, configs={**res["configs"], **one["configs"]})
    if not args.json:
        print("alignment exponent omega_L of W_L Delta h_(L-1), fitted across widths, per training step")
        print(f"{'config':<24}" + "".join(f"{'step ' + str(t + 1):>8}" for t in range(args.steps)))
        for k, v in res["configs"].items():
            print(f"{k:<24}" + "".join(f"{o:>8.2f}" for o in v["omega"]))
    if args.plot:
        from ..plots import plot_lines
        res["plot"] = plot_lines(args.plot, list(range(1, args.steps + 1)),
                                 {k: v["omega"] for k, v in res["configs"].items()}, "step",
                                 "omega_L", "alignment exponent of W_L Delta h_{L-1}", logx=False)
    return res


def _layers(args, data) -> dict:
    """analyze layers: every layer's relative update after training, per rule (diagnostics/layers.py)."""
    from ..algos import make_algo
    from ..diagnostics.coord import coord_batches
    from ..diagnostics.layers import layer_changes
    from ..nets import build
    from ..param import preset
    batches, probe = coord_batches(data, args.steps, 64)
    width = args.widths[0] if args.widths else DEPTH_CHECK_WIDTH
    out = {"arch": args.arch, "depth": args.depth, "width": width, "steps": args.steps, "lrs": {}, "configs": {}}
    algos = args.algos.split(",")
    if args.lrs and len(args.lrs) != len(algos):
        raise MulocalError(f"--lrs has {len(args.lrs)} values for {len(algos)} rules of --algos: give one per rule")
    lrs = dict(zip(algos, args.lrs)) if args.lrs else {}
    with Work("analyze layers", [1.0] * len(algos)) as work:
        for algo in algos:
            work.start(1.0, f"--algo {algo}")
            p = preset(args.params.split(",")[0], "sgd", algo=algo)
            lr = lrs.get(algo, args.lr)
            net = build(args.arch, data.input_shape, data.n_classes, width, p, depth=args.depth, K=args.replicas,
                        seeds=range(args.replicas))
            opts = algo_options_from_args(args, algo, algos)
            res = layer_changes(net, make_algo(algo, **opts), batches, probe, lr)
            key = rule_label(algo, p.name, opts)
            out["configs"][key], out["lrs"][key] = res.to_dict(), lr
            if not args.json:
                work.write(f"== {key} (lr {lr:g}, {args.arch} depth {args.depth}, width {width}, {args.steps} steps)")
                work.write(res.table(every=max(1, args.depth // 8)))
    if args.plot:
        from ..figures import layers_figure
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
    batches, probe = coord_batches(data, args.steps, 64)
    out = {"widths": args.widths, "steps": args.steps, "lr": args.lr, "configs": {}}
    algos, params = args.algos.split(","), args.params.split(",")
    cost = {w: net_cost(w, 3, data.input_shape[-1] if len(data.input_shape) == 1 else 784) for w in args.widths}
    with Work("analyze features", [cost[w] for w in args.widths] * len(algos) * len(params)) as work:
        for algo in algos:
            opts = algo_options_from_args(args, algo, algos)
            for pname in params:
                p = preset(pname, "sgd", algo=algo)
                key = rule_label(algo, p.name, opts)

                def make(w, p=p, key=key):
                    work.start(cost[w], f"{key}, width {w}")
                    return build("mlp", data.input_shape, data.n_classes, w, p, K=args.replicas,
                                 seeds=range(args.replicas))
                res = feature_learning(make, make_algo(algo, **opts), args.widths, batches, probe, args.lr)
                out["configs"][key] = res.to_dict()
                if not args.json:
                    work.write(f"== {key}")
                    work.write(res.table())
    if args.plot:
        from ..figures import features_figure
        out["plot"] = features_figure(out["configs"], args.plot, f"feature learning vs width after {args.steps} "
                                      f"SGD steps, lr {args.lr:g}")
    return out


# ---------------------------------------------------------------------------- flags
def _common(p, widths_help: str, data: bool = True, rule_options: bool = False) -> None:
    """The flags every mode takes; ``rule_options``: the rules' options in the help (features, layers), else parsed
    hidden and refused by ``cmd_analyze`` in one line."""
    p.add_argument("--widths", type=ints, default=None, help=widths_help)
    if data:
        p.add_argument("--dataset", default="fashion-mnist", help="the dataset (default fashion-mnist)")
        p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
        p.add_argument("--no-download", action="store_true", help="never try to download the data")
    p.add_argument("--plot", type=out_file, default=None, help="write a PNG here (after the table is printed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_analyze)
    add_algo_options(p, hidden=not rule_options)  # e.g. --kappa 1 for PC


def _base_width(p) -> None:
    p.add_argument("--base-width", type=int, default=BASE_WIDTH,
                   help=f"the parameterization's base width (muP = SP there; default {BASE_WIDTH})")


def _training(p, steps_help: str, replicas_help: str, algos_help: str) -> None:
    p.add_argument("--algo", "--algos", dest="algos", default="bp,tp,dtp", help=algos_help + " (default bp,tp,dtp)")
    p.add_argument("--steps", type=int, default=10, help=f"{steps_help} (default 10)")
    p.add_argument("--lr", type=lr_value, default=0.1, help="the base learning rate of the SGD steps (default 0.1)")
    p.add_argument("--replicas", type=int, default=3, help=f"{replicas_help} (default 3)")


def add_analyze(an: argparse.ArgumentParser) -> None:
    an.description = "The analyses behind the paper's figures; `mulocal analyze MODE --help` lists a mode's flags."
    modes = an.add_subparsers(dest="what", metavar="MODE", parser_class=type(an), required=True)
    m = {name: modes.add_parser(name, help=text, description=text) for name, text in MODES.items()}
    _common(m["linear"], "widths (default 64..2048)", data=False)
    m["linear"].add_argument("--gamma-bars", type=list_of("float", "gamma_bar_L"), default=None,
                             help="gbar_L values, comma-separated (default -1,0,1)")
    _base_width(m["linear"])

    c = m["cosine"]
    _common(c, "widths (default 64..2048)")
    c.add_argument("--activation", default="linear", choices=("linear", "tanh"), help="the nets' activation "
                   "(default linear)")
    c.add_argument("--gamma-bar-L", type=float, default=0.0, help="PC's output energy exponent (default 0)")
    c.add_argument("--batch-size", type=int, default=32, help="samples of the one batch compared (default 32)")
    c.add_argument("--replicas", type=int, default=3, help="seeds averaged at every width (default 3)")
    _base_width(c)

    _common(m["alignment"], "widths the exponent is fitted across (default 64..2048)")
    _training(m["alignment"], "training steps", "replicas (seeds) averaged at every width",
              "learning rules, comma-separated, each under its muP")

    for name in ("features", "layers"):
        q = m[name]
        if name == "features":
            _common(q, "widths (default 64..2048)", rule_options=True)
            q.add_argument("--params", default="mup", help="presets, comma-separated, e.g. mup,mup-bL1,sp "
                                                           "(default mup)")
        else:
            _common(q, "the width (the first value; default 128)", rule_options=True)
            q.add_argument("--arch", default="resmlp", choices=("mlp", "resmlp"), help="the net (default resmlp)")
            q.add_argument("--depth", type=int, default=16, help="number of weight layers (default 16)")
            q.add_argument("--lrs", type=list_of("lr", "lr"), default=None,
                           help="one base learning rate per rule of --algos (default: --lr for each)")
            q.add_argument("--params", default="mup", help="the preset (default mup)")
        _training(q, "SGD steps", "replicas (seeds) averaged", "learning rules, comma-separated")


__all__ = ["MODES", "add_analyze", "cmd_analyze"]
