"""Every random stream of mulocal, by name, in one place.

A replica is identified by its seed s; each use of randomness draws from its own stream, so that a
replica's numbers depend on its seed alone (not on K, on which replicas it is batched with, nor on
the order in which streams are used) and "replica k equals a separate run" holds. Streams:

==========================  ==================================  ==================================================
name                        seeded with                         used by
==========================  ==================================  ==================================================
``init``                    s                                   ``Net.init`` (forward weights, float64 draws)
``data_order``              SeedSequence([s, 0x5EED])           ``Trainer`` (per-epoch permutations)
``pretrain_order``          SeedSequence([s + 7919, 0x5EED])    ``Trainer._pretrain`` (feedback-only epochs)
``feedback_init``           SeedSequence([s, 0xFEED])           TP/DTP trainable feedback weights
``feedback_noise``          SeedSequence([s, 0x0015E])          TP/DTP feedback-training noise, "host" (CPU default)
``feedback_noise_counter``  SeedSequence([s, 0x0015E, 0xC0])    the same, "counter" (GPU default; a counter key)
``pc_values``               s * 1_000_003 + rule seed           PC random value initialisation
``subset``                  seed (the data seed, not a replica) training/test subsets, validation split, probes
==========================  ==================================  ==================================================

Every stream but ``feedback_noise_counter`` seeds a torch generator; that one is the key of
:func:`counter_normal` (``counter_keys``).

``SeedSequence([..])`` means ``numpy.random.SeedSequence(..).generate_state(1, uint64)[0] >> 1``: a
hashed, well-mixed 63-bit seed. The recipes are frozen: changing one changes every stored result.

Counter-based normals (:func:`counter_normal`): a stream that is a pure function of (key, counter, element
index) instead of a generator with state, drawn for all K replicas at once on any device with torch integer
ops (no per-replica Python loop, no host round trip). Element i (row-major over ``shape``; pair j = i // 2)
of draw ``counter`` of the replica with key k (``counter_keys("feedback_noise_counter", seeds)``) is, on
uint64 (products and sums modulo 2^64, shifts logical):

    mix(z)  = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)
    base    = mix(k ^ mix(counter))                     (the SplitMix64 finaliser)
    bits_j  = mix(base + (j + 1) * 0x9E3779B97F4A7C15)  (output j of SplitMix64 seeded with base)
    u1      = ((bits_j >> 32) + 1) * 2^-32 in (0, 1],   u2 = (bits_j & 0xFFFFFFFF) * 2^-32 in [0, 1)
    r, th   = sqrt(-2 log u1), 2 pi u2                  (Box-Muller in float64)
    normal_{2j} = r cos th,   normal_{2j+1} = r sin th  (then cast to the dtype)

The bits are the same on every device; the normals agree to float64 rounding of log, cos and sin (|x| <= 6.67).
This recipe is frozen like the seeds: changing it changes every result drawn with it.
"""
from __future__ import annotations

import math

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
    "feedback_noise_counter": lambda s, extra: hashed(s, 0x0015E, 0xC0),
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


def counter_keys(name: str, seeds, extra: int = 0, device=None) -> torch.Tensor:
    """One :func:`counter_normal` key per replica seed: the stream's 63-bit seed, as a (K,) int64 tensor."""
    return torch.tensor([seed_of(name, s, extra) for s in seeds], dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------- counter-based normals
_M64 = (1 << 64) - 1
_MUL1, _MUL2, _GAMMA = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def _signed(v: int) -> int:
    """A uint64 value as the int64 with the same bits."""
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: clear the sign-extended bits)."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors, in place (products wrap modulo 2^64, as uint64 products do)."""
    t = torch.empty_like(z)
    for s, m in ((30, _MUL1), (27, _MUL2)):
        torch.bitwise_right_shift(z, s, out=t).bitwise_and_((1 << (64 - s)) - 1)
        z.bitwise_xor_(t).mul_(_signed(m))
    torch.bitwise_right_shift(z, 31, out=t).bitwise_and_((1 << 33) - 1)
    return z.bitwise_xor_(t)


def _mix_int(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


def counter_bits(keys: torch.Tensor, counter, n: int) -> torch.Tensor:
    """64 random bits (as int64) j = 0..n-1 of draw ``counter``: (K, n), row k from keys[k] only.

    ``counter``: a non-negative int, or a 0-dim int64 tensor on the keys' device (mixed there: the same bits,
    and no Python number that changes per draw, so a compiled or captured step can advance it in place)."""
    if isinstance(counter, torch.Tensor):
        if counter.dim() != 0 or counter.dtype != torch.int64:
            raise ValueError(f"a counter tensor must be a 0-dim int64 tensor, got {tuple(counter.shape)} "
                             f"{counter.dtype}")
        mixed = _mix_(counter.to(keys.device, copy=True))
    elif isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
        raise ValueError(f"counter must be a non-negative integer, got {counter!r}")
    else:
        mixed = _signed(_mix_int(counter))
    base = _mix_(keys.to(torch.int64) ^ mixed)  # (K,)
    j = torch.arange(1, n + 1, dtype=torch.int64, device=keys.device).mul_(_signed(_GAMMA))
    return _mix_(j + base.unsqueeze(1))


def counter_normal(keys: torch.Tensor, counter, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normals (K, *shape) for draw ``counter`` (an int or a 0-dim int64 tensor, as in
    :func:`counter_bits`): row k depends only on keys[k], the counter and the
    element index (so replica k equals a separate run), computed on ``device`` (default: the keys') with
    integer tensor ops, no generator state and no host round trip. The recipe is in the module docstring."""
    device = keys.device if device is None else torch.device(device)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    bits = counter_bits(keys.to(device), counter, (n + 1) // 2)  # one pair of normals per 64 bits
    r = _srl(bits, 32).add_(1).to(torch.float64).mul_(2.0 ** -32)  # u1 in (0, 1]: the log is finite
    r = r.log_().mul_(-2.0).sqrt_()
    theta = bits.bitwise_and_(0xFFFFFFFF).to(torch.float64).mul_(2.0 ** -32).mul_(2.0 * math.pi)  # 2 pi u2
    K, m = r.shape
    out = torch.stack((torch.cos(theta).mul_(r), torch.sin(theta).mul_(r)), dim=2).to(dtype)  # 2j cos, 2j+1 sin
    return out.view(K, 2 * m)[:, :n].reshape(K, *shape)


__all__ = ["STREAMS", "counter_bits", "counter_keys", "counter_normal", "generator", "generators", "hashed", "seed_of"]
