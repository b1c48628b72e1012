"""Philox4x32-10 on int64 tensors, bit-identical to csrc/philox.h, so the Python sampler draws the C++ numbers.

32-bit words are held in int64 tensors; the 32x32 -> 64-bit products are split into 16-bit halves so that
nothing overflows int64 (torch has no uint64 arithmetic on every device).
"""
import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF

STREAM_LAYOUT, STREAM_TRUNCATE, STREAM_BATCH = 0, 1, 2


def _mulhilo(a: int, b: torch.Tensor):
    lo16 = b & 0xFFFF
    hi16 = b >> 16
    p_lo = a * lo16  # < 2**48
    p_hi = a * hi16  # < 2**48; the product is p_hi * 2**16 + p_lo
    s = ((p_hi & 0xFFFF) << 16) + p_lo
    return (p_hi >> 16) + (s >> 32), s & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Four int64 tensors of 32-bit counter words (broadcastable) and a 64-bit key -> four output words."""
    for r in range(10):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def mask_draw(seed: int, step: int, stream: int, sample: torch.Tensor, index: torch.Tensor):
    """The sampler's words for (seed, step, stream) at int64 tensors ``sample`` and ``index`` (broadcast)."""
    sample, index = torch.broadcast_tensors(sample, index)
    c2 = torch.full_like(index, step & _MASK32)
    c3 = torch.full_like(index, ((step >> 32) & 0x0FFFFFFF) | (stream << 28))
    return philox4x32_10(index, sample, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)


def below(r: torch.Tensor, n) -> torch.Tensor:
    """Integers in [0, n) from 32-bit words by multiply-shift (n a tensor or int below 2**31)."""
    # r * n can reach 2**63; split r to stay inside int64.
    return ((r >> 16) * n + (((r & 0xFFFF) * n) >> 16)) >> 16
