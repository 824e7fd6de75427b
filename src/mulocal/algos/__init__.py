"""Learning rules. Each exposes ``step(net, x, y, opt=None) -> (grads aligned with net.params(), loss (K,))``.

``opt`` is the optimizer, for rules that update weights during their own step (incremental PC)."""
from __future__ import annotations

from ..errors import ConfigError
from .bp import BP
from .gnt import GNT
from .pc import PC
from .tp import DTP, TP

ALGOS = {"bp": BP, "pc": PC, "tp": TP, "dtp": DTP, "gnt": GNT}


def make_algo(name: str, **options):
    """Instantiate a learning rule by name with its options."""
    if name not in ALGOS:
        raise ConfigError(f"unknown algorithm '{name}'; choose one of {', '.join(sorted(ALGOS))}")
    return ALGOS[name](**options)
