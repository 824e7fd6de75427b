"""Command-line flags generated from one description: the run fields (``config.FIELDS``) and the options
each learning rule declares (``algos/declared.py``). A new field or rule option gets its flag, its help and
its check here without being written again.

Single-run commands (train, coord, derive) take one value per flag; ``sweep`` takes comma-separated
lists (every value is an axis of the sweep).
"""
from __future__ import annotations

import argparse
import copy
import functools

from ..algos.declared import RULES, declared, family
from ..algos.options import float_list as floats, parse_floats
from ..config import COMPILE_MODES, FIELDS, GROUPS, coerce, default_cell
from ..errors import ConfigError, MulocalError
from .paths import checked_dir, out_dir, out_file  # noqa: F401 (the commands' output flags)


def add_compile_flag(p: argparse.ArgumentParser, default: str | None = "off", where: str = "the training step") -> None:
    """--compile (TrainConfig.compile), one help text for train, sweep and reproduce."""
    p.add_argument("--compile", default=default, choices=COMPILE_MODES,
                   help=f"{where} after one eager step: through torch.compile, default (fused kernels) or "
                        "reduce-overhead (also CUDA graphs on a GPU; each run compiles once, tens of seconds), same "
                        "numbers up to float rounding; or cuda-graph (GPU: the eager step recorded once as a CUDA "
                        "graph and replayed, no compiler); default off")


def _typed(key: str, kind: str):
    """argparse type for one value of a field (the field's own check, as a one-line argparse error)."""
    def parse(text: str):
        try:
            return coerce(key, text, kind, what="the value")
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = kind
    return parse


lr_value = _typed("lr", "lr")  # argparse type of one learning rate: positive and finite


def list_of(kind: str, key: str = "value"):
    """argparse type for comma-separated values of a field kind."""
    def parse(text: str):
        parts = split_items(text)
        try:
            return [coerce(key, p, kind, what="each value") for p in parts]
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = f"list of {kind}"
    return parse


def split_items(text: str) -> list[str]:
    """The comma-separated items of a flag's value; an empty item ('0.1,,0.2', a trailing comma) is an error, not
    dropped."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError("expected at least one value")
    if not all(parts):
        raise argparse.ArgumentTypeError(f"an empty item in {text!r}: separate the values by single commas")
    return parts


def ints(text: str) -> list[int]:
    parts = split_items(text)
    try:
        return [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _help(text: str, default) -> str:
    return text if default is None or "default" in text else f"{text} (default {default})"


# ---------------------------------------------------------------------------------------- fields
def add_fields(p: argparse.ArgumentParser, groups=GROUPS, skip=(), only=None, lists: bool = False,
               run_flags: bool = True):
    """One flag per field of ``groups`` (or the fields named in ``only``), in argument groups titled like the
    fields' groups; ``run_flags`` adds --data-dir and --no-download next to --dataset.

    ``lists``: comma-separated values, stored as ``ax_<field>`` (the sweep's axes); otherwise one value,
    stored under the field's name with default None (unset: the field's default)."""
    titles = {}
    for f in FIELDS.values():
        if (f.group not in groups if only is None else f.name not in only) or f.name in skip:
            continue
        if f.group not in titles:
            titles[f.group] = p.add_argument_group(f.group)
        g = titles[f.group]
        if f.kind == "bool":  # --no-bias
            g.add_argument("--no-" + f.name.replace("_", "-"), dest=("ax_" if lists else "") + f.name,
                           action="store_const", const=[False] if lists else False, default=None,
                           help=f.off or f"not: {f.help}")
        elif lists:
            g.add_argument(f.flag, dest="ax_" + f.name, type=list_of(f.kind, f.name), default=None,
                           metavar="V[,V...]", help=_help(f.help, f.default))
        elif f.name == "algo":  # every command takes a list of rules (single-run commands run each in turn)
            g.add_argument(f.flag, type=list_of(f.kind, f.name), default=None, metavar="ALGO[,ALGO...]",
                           help=_help(f.help + "; comma-separated: each in turn", f.default))
        else:
            g.add_argument(f.flag, type=_typed(f.name, f.kind), default=None, metavar=f.name.upper(),
                           help=_help(f.help, f.default))
        if f.name == "optimizer" and not lists:  # the optimizer's width exponents (param.py's module docstring)
            g.add_argument("--eps-exponents", type=floats, default=None, metavar="E_IN,E_HID,E_OUT",
                           help="Adam's eps of each role's layers: eps * m^-e (default: the preset's; mup with adam: 0,0,-1, "
                                "microsoft/mup's readout eps; sp: 0,0,0; 1,1,0 scales it with muP's gradients)")
            g.add_argument("--wd-exponents", type=floats, default=None, metavar="W_IN,W_HID,W_OUT",
                           help="decoupled weight decay of each role's layers: wd * m^-w (default: independent, "
                                "w = -c: lr_l wd_l = lr wd at every width; 0,0,0: coupled to the layer's LR; a "
                                "negative first value: --wd-exponents=-1,0,1)")
        if f.name == "gamma_bar_L" and not lists:
            g.add_argument("--gamma-L-prime", type=float, default=None, help="gamma'_L (default 1)")
        if f.name == "depth" and not lists:  # residual nets: the depth exponents (docs/depth.md)
            g.add_argument("--depth-alpha", type=float, default=None,
                           help="residual branch multiplier a = d^-alpha (default 0.5; 0: the depth-free control)")
            g.add_argument("--depth-c", type=float, default=None,
                           help="residual branch LR exponent c_H (default: derived, 1 - 2 alpha for SGD)")
            g.add_argument("--depth-gamma", type=float, default=None,
                           help="PC on residual nets: hidden energy weights gamma_l = d^depth_gamma (default 1; "
                                "0: the depth-free energy)")
        if f.name == "dataset" and run_flags:
            g.add_argument("--data-dir", default=None, help="folder with the dataset's files")
            g.add_argument("--no-download", action="store_true", help="never try to download the data")


def per_algo(command):
    """A single-run command over ``--algo A,B,...``: run once per rule (its options scoped to the rules that
    declare them) and return ``{"algos": [result, ...]}``; with one rule, that run's result unchanged."""
    @functools.wraps(command)
    def run(args):
        algos = args.algo if isinstance(args.algo, list) else [args.algo]
        if len(algos) <= 1:
            return command(args)
        if getattr(args, "plot", None):
            raise MulocalError("--plot takes one --algo (a figure per rule: run them one at a time)")
        listed = tuple(algos)
        outs, code = [], 0
        for a in algos:
            one = copy.copy(args)
            one.algo, one.listed_algos = [a], listed
            if not getattr(args, "json", False):
                print(f"== --algo {a}")
            out = command(one)
            if isinstance(out, tuple):
                out, c = out
                code = max(code, c)
            outs.append(out)
        return {"algos": outs}, code
    return run


def cell_from_args(args, **extra) -> dict:
    """The cell a single-run command describes: fields from their flags (unset: default), the chosen rule's
    options from theirs, and ``extra`` (e.g. width). ``--algo`` must name one rule here (``per_algo``
    splits a list)."""
    values = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    if isinstance(values.get("algo"), list):
        if len(values["algo"]) != 1:
            raise MulocalError(f"--algo: one rule here, got {','.join(values['algo'])}")
        values["algo"] = values["algo"][0]
    cell = default_cell(**values, **extra)
    cell["algo_options"] = algo_options_from_args(args, cell["algo"], getattr(args, "listed_algos", ()))
    overrides = {k: getattr(args, k) for k in ("gamma_L_prime", "depth_alpha", "depth_c", "depth_gamma",
                                               "eps_exponents", "wd_exponents")
                 if getattr(args, k, None) is not None}
    if overrides:
        cell["param_options"] = overrides
    return cell


# ---------------------------------------------------------------------------------------- rule options
def _declared() -> dict[str, tuple]:
    """flag dest -> (option, rules that declare it), in the order rules declare them."""
    out: dict[str, tuple] = {}
    for name in RULES:  # the declarations, without loading the rules (torch)
        for o in declared(name):
            opt, rules = out.get(o.dest, (o, ()))
            out[o.dest] = (opt, rules + (name,))
    return out


def _option_type(o, lists: bool):
    if lists:
        return list_of({"int": "int", "float": "float", "floats": "float", "str": "str"}[o.kind], o.name)
    if o.kind == "floats":
        return parse_floats
    return {"int": int, "float": float, "str": str}[o.kind]


def add_algo_options(p: argparse.ArgumentParser, lists: bool = False, hidden: bool = False) -> None:
    """One flag per declared option of every learning rule, grouped by the rules that take it. ``hidden``: parsed
    but not in the help (a command that refuses them with a clear line of its own)."""
    groups: dict[tuple, argparse._ArgumentGroup] = {}
    for dest, (o, rules) in _declared().items():
        if rules not in groups:
            title = f"{family(rules[0])} (--algo {', '.join(rules)})"
            groups[rules] = p if hidden else p.add_argument_group(title)
        g = groups[rules]
        text = argparse.SUPPRESS if hidden else o.help
        if o.kind == "bool":
            g.add_argument(o.cli, dest=dest, action="store_const", const=[True] if lists else True, default=None,
                           help=text)
        else:
            g.add_argument(o.cli, dest=dest, type=_option_type(o, lists), default=None,
                           metavar="V[,V...]" if lists else dest.upper(),
                           help=text if hidden else _help(text, o.default))


def given_algo_options(args) -> list[str]:
    """The rule-option flags given on the command line (e.g. ['--kappa'])."""
    return [o.cli for dest, (o, _) in _declared().items() if getattr(args, dest, None) is not None]


def algo_options_from_args(args, algo: str, listed=()) -> dict:
    """Options of ``algo`` from their flags; a flag of another rule is an error naming the rules that take it
    (unless a rule of ``listed``, the other rules of the same command, takes it)."""
    opts = {}
    for dest, (o, rules) in _declared().items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if algo not in rules:
            if any(a in rules for a in listed):
                continue
            raise MulocalError(f"{o.cli} applies to --algo {'/'.join(rules)} only")
        opts[o.name] = value
    return opts


def scoped_algo_options(args, algos) -> dict:
    """Sweep: rule options from their (list) flags, scoped to the swept rules that declare them."""
    out: dict = {}
    for dest, (o, rules) in _declared().items():
        values = getattr(args, dest, None)
        if values is None:
            continue
        takers = [a for a in algos if a in rules]
        if not takers:
            raise MulocalError(f"{o.cli} applies to --algo {'/'.join(rules)} only")
        for a in takers:
            out.setdefault(a, {})[o.name] = values
    return out


__all__ = ["add_algo_options", "add_compile_flag", "add_fields", "algo_options_from_args", "cell_from_args", "floats",
           "checked_dir", "ints", "list_of", "lr_value", "out_dir", "out_file", "per_algo", "scoped_algo_options",
           "split_items"]
