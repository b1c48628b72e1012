"""Derive independent RNG seeds from tuples of integers such as (seed, step) or (seed, epoch, index).

Random draws keyed by a tuple, not by a generator's running state, are what make runs repeat exactly: a
resumed run, a different number of DataLoader workers or another device all see the same numbers.
"""
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser: a bijective 64-bit mix, so distinct inputs never collide.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key and on their order."""
    h = 0x2545F4914F6CDD1D
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"seed keys must be ints, got {type(k).__name__} {k!r}")
        h = _splitmix64(h ^ (k & _MASK64))
    return h >> 1


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by ``derive_seed(*keys)``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*keys))
    return g
