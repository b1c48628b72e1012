"""Mask-sampling benchmark: time per batch of multi-block masks (B = 256; grids 14x14, 16x16, 32x32, 8x14x14).

Providers, named by ``sample_block_masks``'s backends (``iwm_fast.backends.MASKS``): ``ijepa`` (the
I-JEPA collator's algorithm with per-sample Python loops), ``torch`` (our vectorised PyTorch fallback),
``cpp_1thread`` / ``cpp_all_threads`` (the C++ CPU op on its widest vector path) and ``cuda`` (the CUDA op,
launches and the one host sync included). The narrower CPU paths are timed on one core too
(``cpp_1thread_avx2``, ``cpp_1thread_portable``: what a CPU without AVX-512 or AVX2 would run, same masks).
Speedups are reported against ``ijepa``, measured in the same run.
"""
import contextlib
import os

import torch

from iwm_fast.bench import harness
from iwm_fast.masks import _ops, sample_block_masks

GRIDS = [(14, 14), (16, 16), (32, 32), (8, 14, 14)]
QUICK_GRIDS = [(14, 14), (4, 8, 8)]


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
    yield "ijepa", "cpu", lambda: sample_block_masks(batch, grid, backend="ijepa")
    if dev.type == "cpu":
        yield "torch", "cpu", lambda: sample_block_masks(batch, grid, backend="torch")
        if _ops.HAS_EXT:
            yield "cpp_1thread", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp", num_threads=1)
            for path in reversed(_narrower_cpu_paths()):
                yield f"cpp_1thread_{path}", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp",
                                                                                num_threads=1)
            yield "cpp_all_threads", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp",
                                                                       num_threads=os.cpu_count() or 1)
    else:
        yield "torch", device, lambda: sample_block_masks(batch, grid, backend="torch", device=dev)
        if _ops.HAS_EXT:
            yield "cpp_1thread", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp", num_threads=1)
            yield "cpp_all_threads", "cpu", lambda: sample_block_masks(batch, grid, backend="cpp",
                                                                       num_threads=os.cpu_count() or 1)
        if _ops.cuda_available_in_ext():
            yield "cuda", device, lambda: sample_block_masks(batch, grid, backend="cuda", device=dev)


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
            reps = 5 if name == "ijepa" else 30
            path = name.removeprefix("cpp_1thread_") if name.startswith("cpp_1thread_") else None
            with _cpu_path(path):
                stats = harness.time_ms(fn, where, cpu_reps=3 if quick else reps)
            rows.append(harness.row("block_masks", name, shape, torch.int64, "ms_per_batch", stats, meta))
            if name == "ijepa":
                base = stats
            else:
                speed = (base[0] / stats[0], base[0] / stats[2], base[0] / stats[1])
                rows.append(harness.row("block_masks", name, shape, torch.int64, "speedup_vs_ijepa", speed,
                                        meta))
    return rows


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
