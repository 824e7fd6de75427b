"""Learning rules. Each exposes ``step(net, x, y) -> (grads aligned with net.params(), loss (K,))``."""
from __future__ import annotations

from ..errors import ConfigError
from .bp import BP

ALGOS = {"bp": BP}


def make_algo(name: str, **options):
    """Instantiate a learning rule by name with its options."""
    if name not in ALGOS:
        raise ConfigError(f"unknown algorithm '{name}'; choose one of {', '.join(sorted(ALGOS))}")
    return ALGOS[name](**options)
