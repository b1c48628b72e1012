"""Block extents (the I-JEPA scale/aspect law) and the argument checks shared by both sampler backends.

These mirror csrc/ops.cpp (``block_extent``, ``make_mask_spec``) operation by operation in float64 so the
Python and C++ samplers agree bit for bit.
"""
import functools
import math
from typing import NamedTuple
from collections.abc import Sequence

import torch

from .philox import STREAM_BATCH, mask_draw


class Extent(NamedTuple):
    t: int
    h: int
    w: int

    @property
    def size(self) -> int:
        return self.t * self.h * self.w


def block_extent(u: float, scale: Sequence[float], aspect: Sequence[float], grid3: Sequence[int]) -> Extent:
    """Block extent for one uniform ``u`` in [0, 1).

    As I-JEPA's ``_sample_block_size``: one ``u`` sets scale and aspect, ``keep = floor(N * scale)`` tokens,
    ``h = round(sqrt(keep * aspect))``, ``w = round(sqrt(keep / aspect))`` with Python's half-to-even round.
    Differences: sides are clamped to [1, side], so a block may span the whole grid (positions then include
    the last row/column); on T > 1 frames the time extent is ``round(T * scale ** (1/3))`` (a cube's share of
    the scale) and ``keep`` is spread over those frames, so ``scale`` stays a fraction of T*H*W.
    """
    T, H, W = grid3
    s = scale[0] + u * (scale[1] - scale[0])
    a = aspect[0] + u * (aspect[1] - aspect[0])
    keep = int(float(T * H * W) * s)
    t = min(max(round(T * s ** (1.0 / 3.0)), 1), T) if T > 1 else 1
    area = float(keep) / float(t)
    h = min(max(round(math.sqrt(area * a)), 1), H)
    w = min(max(round(math.sqrt(area / a)), 1), W)
    return Extent(t, h, w)


def batch_uniforms(seed: int, step: int) -> tuple[float, float]:
    """(u_target, u_context) of the batch (seed, step), from the batch stream."""
    zero = torch.zeros(1, dtype=torch.long)
    r = mask_draw(seed, step, STREAM_BATCH, zero, zero)
    return int(r[0]) / 4294967296.0, int(r[1]) / 4294967296.0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_range(r, name: str, unit: bool):
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {r!r}") from None
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"{name} must satisfy 0 < low <= high, got {r!r}")
    if unit and hi > 1:
        raise ValueError(f"{name} must lie in (0, 1], got {r!r}")
    return lo, hi


# The extent law is a step function of u; probing it this finely finds its smallest block for checking.
_PROBES = 4097


@functools.lru_cache(maxsize=256)
def _smallest_block(scale, aspect, grid3) -> Extent:
    sizes = (block_extent(i / (_PROBES - 1) * (1 - 2**-32), scale, aspect, grid3) for i in range(_PROBES))
    return min(sizes, key=lambda e: e.size)


def check_args(batch_size, grid, num_targets, num_contexts, target_scale, target_aspect, context_scale,
               context_aspect, min_keep, seed, step, max_tries):
    """Validate sampler arguments; return the normalised (grid3, scales, aspects) or raise a clear error.

    Beyond the per-argument checks, it rejects settings whose smallest possible block is below ``min_keep``:
    the official collator loops forever on those (I-JEPA issue #68).
    """
    for name, v in (("batch_size", batch_size), ("num_targets", num_targets), ("num_contexts", num_contexts),
                    ("min_keep", min_keep), ("seed", seed), ("step", step), ("max_tries", max_tries)):
        if not _is_int(v):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_targets <= 0 or num_contexts <= 0:
        raise ValueError(f"num_targets and num_contexts must be positive, got {num_targets}, {num_contexts}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be non-negative, got {min_keep}")
    if seed < 0 or step < 0 or seed >= 2**63 or step >= 2**60:
        raise ValueError(f"seed must lie in [0, 2**63) and step in [0, 2**60), got {seed}, {step}")
    if max_tries <= 0:
        raise ValueError(f"max_tries must be positive, got {max_tries}")
    if not isinstance(grid, (tuple, list, torch.Size)) or len(grid) not in (2, 3) or not all(_is_int(g) for g in grid):
        raise ValueError(f"grid must be (H, W) or (T, H, W) ints, got {grid!r}")
    if any(g <= 0 for g in grid):
        raise ValueError(f"grid must not be empty: every side must be positive, got {tuple(grid)}")
    grid3 = (1, *grid) if len(grid) == 2 else tuple(grid)
    if grid3[0] * grid3[1] * grid3[2] >= 2**31:
        raise ValueError(f"grid has too many tokens: {tuple(grid)}")
    ts = _check_range(target_scale, "target_scale", True)
    cs = _check_range(context_scale, "context_scale", True)
    ta = _check_range(target_aspect, "target_aspect", False)
    ca = _check_range(context_aspect, "context_aspect", False)
    n = grid3[0] * grid3[1] * grid3[2]
    if min_keep > n:
        raise ValueError(f"grid {tuple(grid)} has {n} tokens, fewer than min_keep={min_keep}")
    for what, sc, asp in (("target", ts, ta), ("context", cs, ca)):
        e = _smallest_block(sc, asp, grid3)
        if e.size < min_keep:
            raise ValueError(
                f"{what} blocks can be as small as {e.t}x{e.h}x{e.w}={e.size} tokens on grid {tuple(grid)} "
                f"({what}_scale={sc}), below min_keep={min_keep}; raise the scale, lower min_keep or use a "
                f"larger grid")
    return grid3, ts, ta, cs, ca
