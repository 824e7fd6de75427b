"""Learning rules. Each exposes ``step(net, x, y, opt=None) -> (grads aligned with net.params(), loss (K,))``
and declares its options in ``OPTIONS`` (``options.Option``: name, type, default, help, flag; the declarations
live in ``declared.py``, without torch).

``opt`` is the optimizer, for rules that update weights during their own step (incremental PC).

A rule's class (and torch) is loaded when first used: ``ALGOS``, ``BP``, ``PC``, ... and ``check_algo``,
``defaults_of``, ``make_algo`` load it; ``options_of`` and the command line's flags read ``declared.py`` only."""
from __future__ import annotations

import importlib
import inspect

from ..errors import ConfigError, check_choice
from .declared import RULES
from .options import Option

INTERNAL = ("loss", "record", "seed")  # constructor arguments that are not user options (loss is a run field)
_CLASSES = {cls: (module, name) for name, (module, cls, _, _) in RULES.items()}  # BP -> ("bp", "bp"), ...


def _load(name: str) -> type:
    module, cls = RULES[name][:2]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def __getattr__(attr: str):
    """``ALGOS`` (name -> class, every rule loaded) and the rule classes, loaded on first use."""
    if attr == "ALGOS":
        algos = {name: _load(name) for name in RULES}
        globals()["ALGOS"] = algos
        return algos
    if attr in _CLASSES:
        cls = _load(_CLASSES[attr][1])
        globals()[attr] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _known(name: str) -> None:
    check_choice("algorithm", name, sorted(RULES))


def check_algo(name: str) -> type:
    _known(name)
    return _load(name)


def options_of(name: str) -> dict[str, Option]:
    """The declared options of a learning rule, by name (without loading the rule)."""
    _known(name)
    return {o.name: o for o in RULES[name][3]}


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
