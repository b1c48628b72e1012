"""``sample_block_masks``: I-JEPA multi-block masks from the C++/CUDA op, or the vectorised Python fallback."""
import logging

import torch

from . import _ops
from .extents import batch_uniforms, block_extent, check_args
from .reference import sample_block_masks_python

logger = logging.getLogger("iwm_fast")
_warned = False

BACKENDS = ("auto", "cpp", "python")


def _note_fallback():
    global _warned
    if not _warned:
        _warned = True
        logger.warning("iwm_fast._C is not built (%s); sampling masks with the Python implementation",
                       _ops.IMPORT_ERROR)


def sample_block_masks(batch_size, grid, *, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                       context_scale=(0.85, 1.0), context_aspect=(1.0, 1.0), num_contexts=1, min_keep=10,
                       allow_overlap=False, seed=0, step=0, device="cpu", backend="auto", num_threads=None,
                       max_tries=100):
    """Sample I-JEPA multi-block masks for one batch.

    Args:
        batch_size: samples B.
        grid: ``(H, W)`` patches, or ``(T, H, W)`` for video tubelets (blocks then also span a time range).
        num_targets: target blocks per sample. One target extent and one context extent per batch, from
            (seed, step); one uniform sets both scale and aspect, as in I-JEPA.
        target_scale, target_aspect, context_scale, context_aspect: (low, high) ranges; scales are fractions
            of the grid's tokens, in (0, 1].
        num_contexts: context blocks per sample (I-JEPA's ``nenc``); each is its block minus all targets.
        min_keep: every context keeps at least this many tokens; blocks smaller than this are an error.
        allow_overlap: keep target tokens in the context.
        seed, step: the batch is a pure function of (seed, step) and the other arguments.
        device: where the index tensors are made (the CUDA op samples on the GPU).
        backend: "auto" (C++ op when built, else Python, said once in the log), "cpp" or "python". Both
            return identical masks.
        num_threads: CPU threads of the C++ op (default: torch's); results do not depend on it.
        max_tries: layouts drawn per sample before giving up with an error (a rejected layout is redrawn
            whole, targets included).

    Returns:
        ``(context, targets)``: int64 ``[B, Nc]`` (``[B, num_contexts, Nc]`` when ``num_contexts > 1``) and
        ``[B, num_targets, Nt]``, flat indices ``h*W + w`` (``t*H*W + h*W + w``), ascending within each block.
        Nc is the batch's smallest context count: each context keeps a uniformly random subset of that size
        (not its first tokens, which would always drop the bottom rows of large contexts).
        Targets are never truncated: every target block of a batch has the same size.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads <= 0):
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    grid3, ts, ta, cs, ca = check_args(batch_size, grid, num_targets, num_contexts, target_scale, target_aspect,
                                       context_scale, context_aspect, min_keep, seed, step, max_tries)
    device = torch.device(device)
    use_cpp = backend == "cpp" or (backend == "auto" and _ops.HAS_EXT)
    if use_cpp and not _ops.HAS_EXT:
        raise RuntimeError(f"backend='cpp' but iwm_fast._C is not built: {_ops.IMPORT_ERROR}")
    if use_cpp and device.type == "cuda" and not _ops.cuda_available_in_ext():
        if backend == "cpp":
            raise RuntimeError("backend='cpp' on CUDA but iwm_fast._C was built without CUDA")
        use_cpp = False
    if use_cpp and device.type not in ("cpu", "cuda"):
        use_cpp = False
    if backend == "auto" and not _ops.HAS_EXT:
        _note_fallback()

    if use_cpp:
        anchor = torch.empty(0, device=device)
        context, targets = torch.ops.iwm_fast.sample_block_masks(
            anchor, batch_size, list(grid), num_targets, num_contexts, list(ts), list(ta), list(cs), list(ca),
            min_keep, allow_overlap, seed, step, max_tries, num_threads or 0)
    else:
        ut, uc = batch_uniforms(seed, step)
        target, context_ext = block_extent(ut, ts, ta, grid3), block_extent(uc, cs, ca, grid3)
        context, targets = sample_block_masks_python(batch_size, grid3, num_targets, num_contexts, target,
                                                     context_ext, min_keep, allow_overlap, seed, step, max_tries,
                                                     device)
    return (context[:, 0] if num_contexts == 1 else context), targets
