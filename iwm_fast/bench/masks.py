"""Mask-sampling benchmark: time per batch of multi-block masks (B = 256; grids 14x14, 16x16, 32x32, 8x14x14).

Providers: ``ijepa_loop`` (the I-JEPA collator's algorithm with per-sample Python loops, written below),
``python_vectorised`` (our fallback), ``cpp_1thread`` / ``cpp_all_threads`` (the C++ CPU op on its widest
vector path) and ``cuda`` (the CUDA op, launches and the one host sync included). The narrower CPU paths are
timed on one core too (``cpp_1thread_avx2``, ``cpp_1thread_portable``: what a CPU without AVX-512 or AVX2
would run, same masks). Speedups are reported against ``ijepa_loop``, measured in the same run.
"""
import contextlib
import math
import os

import torch

from iwm_fast.bench import harness
from iwm_fast.masks import _ops, sample_block_masks

GRIDS = [(14, 14), (16, 16), (32, 32), (8, 14, 14)]
QUICK_GRIDS = [(14, 14), (4, 8, 8)]


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
    raise RuntimeError("no valid block")


def ijepa_loop_masks(batch_size, grid, seed=0, step=0, num_targets=4, min_keep=10):
    """The official collator's algorithm: Python loops over samples and blocks, dense masks, cut to the minimum."""
    grid3 = (1, *grid) if len(grid) == 2 else tuple(grid)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    p_ext = _ijepa_extent(gen, (0.15, 0.2), (0.75, 1.5), grid3)
    e_ext = _ijepa_extent(gen, (0.85, 1.0), (1.0, 1.0), grid3)
    enc, pred = [], []
    keep_enc = keep_pred = T_ = None
    keep_enc = keep_pred = 1 << 30
    for _ in range(batch_size):
        targets, complements = [], []
        for _ in range(num_targets):
            idx, comp = _ijepa_block(gen, p_ext, grid3, min_keep)
            targets.append(idx)
            complements.append(comp)
            keep_pred = min(keep_pred, idx.numel())
        ctx, _ = _ijepa_block(gen, e_ext, grid3, min_keep, forbidden=complements)
        keep_enc = min(keep_enc, ctx.numel())
        pred.append(targets)
        enc.append(ctx)
    context = torch.stack([c[:keep_enc] for c in enc])
    targets = torch.stack([torch.stack([t[:keep_pred] for t in ts]) for ts in pred])
    return context, targets


def _narrower_cpu_paths():
    """The C++ op's CPU vector paths narrower than the best one this CPU has (timed too, as cpp_1thread_PATH)."""
    order = ["portable", "avx2", "avx512"]
    return order[:order.index(_ops.cpu_vector_path())] if _ops.HAS_EXT else []


@contextlib.contextmanager
def _cpu_path(path):
    if path is None:
        yield
        return
    best = _ops.cpu_vector_path()
    _ops.set_cpu_vector_path(path)
    try:
        yield
    finally:
        _ops.set_cpu_vector_path(best)


def _providers(device, batch, grid):
    dev = torch.device(device)
    yield "ijepa_loop", "cpu", lambda: ijepa_loop_masks(batch, grid)
    if dev.type == "cpu":
        yield "python_vectorised", "cpu", lambda: sample_block_masks(batch, grid, backend="python")
        if _ops.HAS_EXT:
            yield "cpp_1thread", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp", num_threads=1)
            for path in reversed(_narrower_cpu_paths()):
                yield f"cpp_1thread_{path}", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp",
                                                                                num_threads=1)
            yield "cpp_all_threads", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp",
                                                                       num_threads=os.cpu_count() or 1)
    else:
        yield "python_vectorised", device, lambda: sample_block_masks(batch, grid, backend="python", device=dev)
        if _ops.HAS_EXT:
            yield "cpp_1thread", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp", num_threads=1)
            yield "cpp_all_threads", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp",
                                                                       num_threads=os.cpu_count() or 1)
        if _ops.cuda_available_in_ext():
            yield "cuda", device, lambda: sample_block_masks(batch, grid, backend="cpp", device=dev)


def run(device: str, quick: bool) -> list[dict]:
    cuda = torch.device(device).type == "cuda"
    batch = 32 if quick and not cuda else 256
    grids = QUICK_GRIDS if quick and not cuda else GRIDS
    meta = harness.metadata(device)
    rows = []
    for grid in grids:
        shape = f"B{batch}_" + "x".join(map(str, grid))
        base = None
        for name, where, fn in _providers(device, batch, grid):
            reps = 5 if name == "ijepa_loop" else 30
            path = name.removeprefix("cpp_1thread_") if name.startswith("cpp_1thread_") else None
            with _cpu_path(path):
                stats = harness.time_ms(fn, where, cpu_reps=3 if quick else reps)
            rows.append(harness.row("block_masks", name, shape, torch.int64, "ms_per_batch", stats, meta))
            if name == "ijepa_loop":
                base = stats
            else:
                speed = (base[0] / stats[0], base[0] / stats[2], base[0] / stats[1])
                rows.append(harness.row("block_masks", name, shape, torch.int64, "speedup_vs_ijepa_loop", speed,
                                        meta))
    return rows


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
