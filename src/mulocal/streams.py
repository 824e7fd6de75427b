"""Every random stream of mulocal, by name, in one place.

A replica is identified by its seed s; each use of randomness draws from its own stream, so that a
replica's numbers depend on its seed alone (not on K, on which replicas it is batched with, nor on
the order in which streams are used) and "replica k equals a separate run" holds. Streams:

==================  ==================================  ============================================
name                torch generator seeded with         used by
==================  ==================================  ============================================
``init``            s                                   ``Net.init`` (forward weights, float64 draws)
``data_order``      SeedSequence([s, 0x5EED])           ``Trainer`` (per-epoch permutations)
``pretrain_order``  SeedSequence([s + 7919, 0x5EED])    ``Trainer._pretrain`` (feedback-only epochs)
``feedback_init``   SeedSequence([s, 0xFEED])           TP/DTP trainable feedback weights
``feedback_noise``  SeedSequence([s, 0x0015E])          TP/DTP feedback-training noise
``pc_values``       s * 1_000_003 + rule seed           PC random value initialisation
``subset``          seed (the data seed, not a replica) training/test subsets, validation split, probes
==================  ==================================  ============================================

``SeedSequence([..])`` means ``numpy.random.SeedSequence(..).generate_state(1, uint64)[0] >> 1``: a
hashed, well-mixed 63-bit seed. The recipes are frozen: changing one changes every stored result.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError


def hashed(*entropy: int) -> int:
    """A 63-bit seed from integers, through numpy's SeedSequence (well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0] >> 1)


_RECIPES = {
    "init": lambda s, extra: int(s),
    "data_order": lambda s, extra: hashed(s, 0x5EED),
    "pretrain_order": lambda s, extra: hashed(int(s) + 7919, 0x5EED),
    "feedback_init": lambda s, extra: hashed(s, 0xFEED),
    "feedback_noise": lambda s, extra: hashed(s, 0x0015E),
    "pc_values": lambda s, extra: int(s) * 1_000_003 + int(extra),
    "subset": lambda s, extra: int(s),
}
STREAMS = tuple(_RECIPES)


def seed_of(name: str, seed: int, extra: int = 0) -> int:
    """The integer a stream's generator is seeded with (``extra``: the PC rule's own seed)."""
    if name not in _RECIPES:
        raise ConfigError(f"unknown random stream '{name}'; known: {', '.join(STREAMS)}")
    return _RECIPES[name](seed, extra)


def generator(name: str, seed: int, extra: int = 0, device=None) -> torch.Generator:
    """A fresh torch generator for stream ``name`` of the replica with seed ``seed``."""
    g = torch.Generator() if device is None else torch.Generator(device=device)
    return g.manual_seed(seed_of(name, seed, extra))


def generators(name: str, seeds, extra: int = 0) -> list[torch.Generator]:
    """One generator per replica seed."""
    return [generator(name, s, extra) for s in seeds]


__all__ = ["STREAMS", "generator", "generators", "hashed", "seed_of"]
