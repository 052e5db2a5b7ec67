"""Counter-based random integers (SplitMix64), so that item i of a seeded set needs no state.

``mix(seed, i, ...)`` gives a well-scrambled uint64 for any tuple of integers; datasets draw
item i's attributes from ``mix(seed, i, attempt, salt) % k`` and the batch iterator seeds each
epoch's permutation with ``mix(seed, epoch)``. Reference: Steele, Lea & Flood, "Fast splittable
pseudorandom number generators" (OOPSLA 2014), the SplitMix64 finaliser.
"""

from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK63 = (1 << 63) - 1


def splitmix64(x) -> np.ndarray:
    """SplitMix64 finaliser of (x + golden gamma), elementwise on uint64 (wrapping mod 2^64)."""
    z = np.atleast_1d(np.asarray(x, dtype=np.uint64)) + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _u64(v) -> np.ndarray:
    """A Python int or an integer array as uint64 (negative values in two's complement)."""
    if isinstance(v, (int, np.integer)):
        return np.atleast_1d(np.uint64(int(v) & ((1 << 64) - 1)))
    a = np.asarray(v)
    if a.dtype.kind not in "iu":
        raise TypeError(f"expected integers, got dtype {a.dtype}")
    return np.atleast_1d(a.astype(np.int64).view(np.uint64) if a.dtype.kind == "i" else a.astype(np.uint64))


def mix(*parts) -> np.ndarray:
    """Hash a tuple of integers or broadcastable integer arrays to uint64: chained SplitMix64."""
    h = splitmix64(np.uint64(0x5DEECE66D))
    for p in parts:
        h = splitmix64(h ^ _u64(p))
    return h


def seed_from(*parts) -> int:
    """A non-negative 63-bit Python int from `mix(*parts)` (for torch.Generator.manual_seed)."""
    return int(mix(*parts)[0]) & _MASK63
