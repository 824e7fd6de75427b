"""What a learning rule declares about its options: name, type, default, help, command-line flag.

Each rule class lists its options in ``OPTIONS``, declared in ``declared.py`` (torch-free, read by the
command line without loading the rules); the command line generates one flag per option (``--T``,
``--feedback``, ...) and the sweep checks ``algo_options`` against them, so adding an option to a rule
touches its declaration and the rule's constructor only. ``loss`` is not an option: it is a field of the run
(``config.FIELDS``) that every rule takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("int", "float", "str", "bool", "floats")  # floats: one number or a comma-separated list (per layer)


@dataclass(frozen=True)
class Option:
    name: str  # the constructor argument
    kind: str
    default: Any
    help: str
    flag: str | None = None  # command-line flag name if not the name with dashes (e.g. "inference-momentum")
    choices: tuple | None = None
    # An option added after stores exist sets implicit=True: a cell's recorded options (``algo_resolved``, part
    # of its hash) leave it out at its default, so old cells keep their hashes; a rule whose *behaviour* at
    # the default changed for some cells names them in ``hash_defaults`` so that those get new hashes.
    implicit: bool = False

    @property
    def cli(self) -> str:
        return "--" + (self.flag or self.name.replace("_", "-"))

    @property
    def dest(self) -> str:
        return (self.flag or self.name).replace("-", "_")


def float_list(text: str) -> list[float]:
    """'0.5,0.2' -> [0.5, 0.2] (argparse type; the command line's comma-separated numbers)."""
    import argparse
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def parse_floats(text: str):
    """'0.5' -> 0.5, '0.5,0.2' -> [0.5, 0.2] (argparse type of ``floats`` options: one, or one per layer)."""
    vals = float_list(text)
    return vals[0] if len(vals) == 1 else vals


__all__ = ["KINDS", "Option", "float_list", "parse_floats"]
