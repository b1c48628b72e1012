"""I-JEPA's multi-block mask algorithm as its collator runs it: per-sample Python loops on the CPU.

The baseline that the mask benchmark and the end-to-end benchmark's configuration (a) time against our sampler:
``sample_block_masks(..., backend="ijepa")`` and ``Backends(masks="ijepa")`` in the training step run it.
"""
import math

import torch


def _ijepa_extent(gen, scale, aspect, grid3):
    T, H, W = grid3
    u = torch.rand(1, generator=gen).item()
    s = scale[0] + u * (scale[1] - scale[0])
    a = aspect[0] + u * (aspect[1] - aspect[0])
    keep = int(T * H * W * s)
    t = min(max(round(T * s ** (1 / 3)), 1), T) if T > 1 else 1
    h = min(max(round(math.sqrt(keep / t * a)), 1), H)
    w = min(max(round(math.sqrt(keep / t / a)), 1), W)
    return t, h, w


def _ijepa_block(gen, ext, grid3, min_keep, forbidden=None, max_tries=100):
    """One block as I-JEPA places it: a dense mask per try, constrained by the complements of the targets."""
    T, H, W = grid3
    t, h, w = ext
    for _ in range(max_tries):
        t0 = torch.randint(0, T - t + 1, (1,), generator=gen).item()
        h0 = torch.randint(0, H - h + 1, (1,), generator=gen).item()
        w0 = torch.randint(0, W - w + 1, (1,), generator=gen).item()
        mask = torch.zeros(T, H, W, dtype=torch.int32)
        mask[t0:t0 + t, h0:h0 + h, w0:w0 + w] = 1
        if forbidden is not None:
            for f in forbidden:
                mask *= f
        idx = torch.nonzero(mask.flatten()).squeeze()
        if idx.numel() >= min_keep:
            complement = torch.ones(T, H, W, dtype=torch.int32)
            complement[t0:t0 + t, h0:h0 + h, w0:w0 + w] = 0
            return idx, complement
    raise ValueError(f"no block of {t}x{h}x{w} tokens keeps min_keep={min_keep} in max_tries={max_tries} tries")


def ijepa_loop_masks(batch_size, grid, seed=0, step=0, num_targets=4, min_keep=10, target_scale=(0.15, 0.2),
                     target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), max_tries=100):
    """The official collator's algorithm: Python loops over samples and blocks, dense masks, cut to the minimum.

    Returns ``(context [B, Nc], targets [B, M, Nt])`` int64 CPU tensors, keyed by (seed, step)."""
    grid3 = (1, *grid) if len(grid) == 2 else tuple(grid)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    p_ext = _ijepa_extent(gen, tuple(target_scale), tuple(target_aspect), grid3)
    e_ext = _ijepa_extent(gen, tuple(context_scale), (1.0, 1.0), grid3)
    enc, pred = [], []
    keep_enc = keep_pred = 1 << 30
    for _ in range(batch_size):
        targets, complements = [], []
        for _ in range(num_targets):
            idx, comp = _ijepa_block(gen, p_ext, grid3, min_keep, max_tries=max_tries)
            targets.append(idx)
            complements.append(comp)
            keep_pred = min(keep_pred, idx.numel())
        ctx, _ = _ijepa_block(gen, e_ext, grid3, min_keep, forbidden=complements, max_tries=max_tries)
        keep_enc = min(keep_enc, ctx.numel())
        pred.append(targets)
        enc.append(ctx)
    context = torch.stack([c[:keep_enc] for c in enc])
    targets = torch.stack([torch.stack([t[:keep_pred] for t in ts]) for ts in pred])
    return context, targets
