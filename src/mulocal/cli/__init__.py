"""Command line: ``mulocal train | eval | export | coord | derive | describe | analyze | data | sweep | report |
plot | reproduce | demo`` (also ``python -m mulocal``).

Every command that produces numbers accepts ``--json`` and then prints exactly one JSON object on stdout
(progress goes to stderr). Bad input exits with status 2 and one line on stderr; a warning of mulocal's own
(``errors.MulocalWarning``, e.g. an unstable parameterization) is one line on stderr, once per run. The flags
that describe a run are generated from ``config.FIELDS`` and the learning rules' declared options (``flags.py``); the
commands build their runs with ``config.assemble``. A command's flags are added when it is used (``COMMANDS``), so
that ``mulocal --help``, ``--version`` and a mistyped command answer without loading torch. Output paths are
checked when parsed and their folders made before the work starts (``paths.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import warnings

from ..errors import MulocalError, MulocalWarning
from ..util import json_safe

# name -> (module of this package, one line of help), in the order `mulocal --help` lists them. A command's flags
# are added when it is used: --version, --help and a mistyped command answer at once, and so does a mistyped flag of
# the commands whose flags come from config.FIELDS and algos/declared.py alone (all but export and the sweeps').
COMMANDS = {
    "train": ("commands", "train one model (or K replicas) and evaluate it"),
    "eval": ("models", "evaluate a checkpoint on a dataset's test set, per replica"),
    "export": ("models", "write replica k of a checkpoint as plain PyTorch (muP multipliers folded in)"),
    "coord": ("commands", "coordinate check: per-layer update sizes vs width, fitted slopes"),
    "derive": ("commands", "fit the width exponents (b_L, c) that make every update Theta(1)"),
    "analyze": ("analyze", "cosine to BP vs width, alignment exponents, deep-linear ||C||, per-layer feature "
                           "learning, every layer's relative update (layers)"),
    "describe": ("commands", "print what a preset resolves to at a width"),
    "data": ("commands", "fetch or check a dataset"),
    "sweep": ("sweeps", "run a grid of widths x learning rates x seeds x ... into a store"),
    "report": ("sweeps", "best LR per width, transfer slope and penalty from a sweep store"),
    "plot": ("sweeps", "write loss / accuracy vs learning rate plots of a sweep store"),
    "reproduce": ("sweeps", "reproduce a figure of the paper (fig1-left, fig1-right, fig3, fig7, fig8, cnn, table1), "
                            "our depth-transfer experiment (depth), or all of them (all)"),
    "demo": ("sweeps", "the muTransfer demo on FashionMNIST: muP keeps the best LR, SP moves it"),
}


class _Parser(argparse.ArgumentParser):
    """One clear error line; ``fill(parser)``, if given, adds the flags when the parser is first used."""

    def __init__(self, *args, fill=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fill = fill

    def _filled(self) -> None:
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill(self)

    def parse_known_args(self, args=None, namespace=None):
        self._filled()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._filled()
        return super().format_help()

    def format_usage(self):
        self._filled()
        return super().format_usage()

    def error(self, message):  # one clear line instead of usage + message
        self.exit(2, f"mulocal: error: {message} (see `{self.prog} --help`)\n")


def _filler(name: str, module: str):
    def fill(p: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(f"{__name__}.{module}"), "add_" + name)(p)
    return fill


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = _Parser(prog="mulocal", description="Width-stable local learning: muP for PC and TP, muTransfer.")
    p.add_argument("--version", action="version", version=f"mulocal {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for name, (module, text) in COMMANDS.items():
        sub.add_parser(name, help=text, fill=_filler(name, module))
    return p


POSITIVE = ("width", "steps", "epochs", "batch_size", "replicas", "depth", "base_width", "rounds")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    for key in POSITIVE:
        v = getattr(args, key, None)
        if v is not None and not isinstance(v, list) and v <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {v}")
    for w in getattr(args, "widths", None) or []:
        if w <= 0:
            parser.error(f"--widths must be positive, got {w}")
    return dispatch(args)


@contextlib.contextmanager
def one_line_warnings():
    """Show each distinct :class:`MulocalWarning` once, as ``mulocal: warning: <message>`` on stderr (no
    file/line, no source line); other warnings as Python shows them. ``-W`` / ``PYTHONWARNINGS`` still
    apply (``-W error::UserWarning`` turns it into an error, ``-W ignore`` hides it)."""
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=MulocalWarning, append=True)  # deduplicated below, per run
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, MulocalWarning):
                return shown(message, category, filename, lineno, file, line)
            text = " ".join(str(message).split())
            if text not in seen:
                seen.add(text)
                print(f"mulocal: warning: {text}", file=sys.stderr)

        warnings.showwarning = show
        yield


def dispatch(args) -> int:
    """Run a parsed command: one error line and status 2 for bad input, one JSON object with --json."""
    with one_line_warnings():
        return _dispatch(args)


def _dispatch(args) -> int:
    from .paths import prepare_outputs
    code = 0
    as_json = getattr(args, "json", False)
    try:
        prepare_outputs(args)  # every output folder created (or refused) before the work starts
        if as_json:  # stdout carries one JSON object: anything else printed meanwhile (Ray's logs) goes to stderr
            with contextlib.redirect_stdout(sys.stderr):
                out = args.func(args)
        else:
            out = args.func(args)
        if isinstance(out, tuple):  # (result, exit status): a command that ran but failed (sweep, data check)
            out, code = out
    except MulocalError as err:
        print(f"mulocal: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file that could not be written or read after all (disk full, removed folder)
        print(f"mulocal: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mulocal: interrupted", file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps(json_safe(out)))
    return code


__all__ = ["build_parser", "dispatch", "main"]
