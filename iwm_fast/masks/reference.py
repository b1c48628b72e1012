"""Vectorised PyTorch multi-block mask sampler, on any device; the fallback when ``iwm_fast._C`` is absent.

Same algorithm and the same Philox streams as csrc/block_masks_cpu.cpp, so it returns the same masks as the
C++ op. The only Python loop runs over rejection attempts (bounded by ``max_tries``, almost always one or
two), never over samples.
"""
import torch

from .extents import Extent
from .philox import STREAM_LAYOUT, STREAM_TRUNCATE, below, mask_draw


def _membership(corner: torch.Tensor, ext: Extent, grid3) -> torch.Tensor:
    """Tokens inside blocks. corner [..., 3] (t, h, w) -> bool [..., N].

    Built as the outer product of per-axis ranges (T + H + W comparisons, not 6 N).
    """
    axes = []
    for d, (side, e) in enumerate(zip(grid3, ext)):
        r = torch.arange(side, device=corner.device)
        c = corner[..., d, None]
        axes.append((r >= c) & (r < c + e))
    t, h, w = axes
    return (t[..., :, None, None] & h[..., None, :, None] & w[..., None, None, :]).flatten(-3)


def _corners(seed, step, samples, attempt, num_blocks, num_targets, grid3, target, context, device):
    """Corners [S, num_blocks, 3] of the given samples at one attempt (targets first, then contexts)."""
    T, H, W = grid3
    j = torch.arange(num_blocks, device=device)
    r0, r1, r2, _ = mask_draw(seed, step, STREAM_LAYOUT, samples[:, None], attempt * num_blocks + j[None, :])
    is_t = j < num_targets
    span = lambda side, e_t, e_c: torch.where(is_t, side - e_t + 1, side - e_c + 1)  # noqa: E731
    return torch.stack([below(r2, span(T, target.t, context.t)), below(r0, span(H, target.h, context.h)),
                        below(r1, span(W, target.w, context.w))], dim=-1)


def sample_block_masks_python(batch_size, grid3, num_targets, num_contexts, target: Extent, context: Extent,
                              min_keep, allow_overlap, seed, step, max_tries, device):
    """Context [B, num_contexts, Nc] and targets [B, num_targets, Nt] int64 flat indices (arguments checked)."""
    T, H, W = grid3
    N = T * H * W
    n = torch.arange(N, device=device)
    nb = num_targets + num_contexts
    corners = torch.empty(batch_size, nb, 3, dtype=torch.long, device=device)
    counts = torch.full((batch_size,), -1, dtype=torch.long, device=device)
    in_ctx = torch.empty(batch_size, num_contexts, N, dtype=torch.bool, device=device)
    pending = torch.arange(batch_size, device=device)
    for attempt in range(max_tries):
        cor = _corners(seed, step, pending, attempt, nb, num_targets, grid3, target, context, device)
        ctx = _membership(cor[:, num_targets:], context, grid3)  # [S, C, N]
        if not allow_overlap:
            ctx &= ~_membership(cor[:, :num_targets], target, grid3).any(1, keepdim=True)
        least = ctx.sum(-1).amin(-1)
        ok = least >= min_keep
        done = pending[ok]
        corners[done], counts[done], in_ctx[done] = cor[ok], least[ok], ctx[ok]
        pending = pending[~ok]
        if pending.numel() == 0:
            break
    if pending.numel():
        raise ValueError(
            f"no layout kept min_keep={min_keep} context tokens clear of {num_targets} target blocks of "
            f"{target.t}x{target.h}x{target.w} within max_tries={max_tries} on grid {grid3}; lower num_targets, "
            f"target_scale or min_keep, or allow_overlap=True")
    keep = int(counts.min())

    # Truncation: keep the `keep` smallest (key, flat index) pairs of each context, in index order.
    quads = (N + 3) // 4
    b = torch.arange(batch_size, device=device)[:, None, None]
    q = torch.arange(num_contexts, device=device)[None, :, None] * quads + torch.arange(quads, device=device)
    key = torch.stack(mask_draw(seed, step, STREAM_TRUNCATE, b, q), dim=-1).flatten(-2)[..., :N]
    big = torch.iinfo(torch.long).max
    order = torch.where(in_ctx, (key << 31) | n, big)
    chosen = order.topk(keep, dim=-1, largest=False, sorted=False).values & (2**31 - 1)
    context_idx = chosen.sort(dim=-1).values

    # Targets: every token of each block, in ascending flat order (t, then h, then w).
    dt, dh, dw = torch.meshgrid(torch.arange(target.t, device=device), torch.arange(target.h, device=device),
                                torch.arange(target.w, device=device), indexing="ij")
    tc = corners[:, :num_targets, :, None]
    targets = ((tc[:, :, 0] + dt.flatten()) * (H * W) + (tc[:, :, 1] + dh.flatten()) * W
               + tc[:, :, 2] + dw.flatten())
    return context_idx, targets
