"""Learning rules. Each exposes ``step(net, x, y, opt=None) -> (grads aligned with net.params(), loss (K,))``
and declares its options in ``OPTIONS`` (``options.Option``: name, type, default, help, flag).

``opt`` is the optimizer, for rules that update weights during their own step (incremental PC)."""
from __future__ import annotations

import inspect

from ..errors import ConfigError
from .bp import BP
from .gnt import GNT
from .options import Option
from .pc import PC
from .tp import DTP, TP

ALGOS = {"bp": BP, "pc": PC, "tp": TP, "dtp": DTP, "gnt": GNT}
INTERNAL = ("loss", "record", "seed")  # constructor arguments that are not user options (loss is a run field)


def check_algo(name: str) -> type:
    if name not in ALGOS:
        raise ConfigError(f"unknown algorithm '{name}'; choose one of {', '.join(sorted(ALGOS))}")
    return ALGOS[name]


def options_of(name: str) -> dict[str, Option]:
    """The declared options of a learning rule, by name."""
    return {o.name: o for o in check_algo(name).OPTIONS}


def defaults_of(name: str) -> dict:
    """Every constructor default of a learning rule (declared options and internal arguments)."""
    out = {}
    for arg, p in inspect.signature(check_algo(name)).parameters.items():
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[arg] = p.default
    return out


def make_algo(name: str, **options):
    """Instantiate a learning rule by name with its options (an option it does not declare is a ConfigError)."""
    cls = check_algo(name)
    known = options_of(name)
    bad = sorted(k for k in options if k not in known and k not in INTERNAL)
    if bad:
        listed = ", ".join(known) or "none"
        raise ConfigError(f"learning rule '{name}' does not take option(s) {bad} (its options: {listed})")
    return cls(**options)


__all__ = ["ALGOS", "INTERNAL", "Option", "check_algo", "defaults_of", "make_algo", "options_of"]
