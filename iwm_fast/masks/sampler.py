"""``sample_block_masks``: I-JEPA multi-block masks, by one of the mask-sampler backends.

``BACKENDS`` (``iwm_fast.backends.MASKS``, the one list: ``Backends(masks=...)``, the collator, the mask
benchmark and the tests use these names) are:

* ``auto`` (the default): the C++ op's kernels for the output's device (``cpp`` on the CPU, ``cuda`` on a GPU),
  or ``torch`` where the extension has none (said once in the log). The training step samples on the host and
  copies the masks to the device asynchronously: no host sync.
* ``cpp``: the C++ op's OpenMP/SIMD CPU kernels (masks on the CPU).
* ``cuda``: the C++ op's CUDA kernels (masks on a CUDA device). They read the batch's token counts back: in the
  training step (``Backends(masks="cuda")``, opt-in) that is one host sync per step.
* ``torch``: the vectorised PyTorch implementation, on any device. ``cpp``, ``cuda`` and ``torch`` return the
  same masks for the same arguments.
* ``ijepa``: I-JEPA's collator algorithm, per-sample Python loops on the CPU (``iwm_fast.masks.ijepa_loop``):
  the reference baseline of the benchmarks. Other masks than the rest for the same (seed, step); it takes one
  context block of aspect 1 and no ``allow_overlap``.
"""
import torch

from ..backends import MASKS as BACKENDS
from ..ops.dispatch import check_backend, use_extension
from . import _ops
from .extents import batch_uniforms, block_extent, check_args
from .ijepa_loop import ijepa_loop_masks
from .reference import sample_block_masks_python


def _extension_missing(device_type):
    """Why the built extension has no mask kernel for ``device_type`` (None when it has one)."""
    if not _ops.HAS_EXT:
        return f"iwm_fast._C is not built ({_ops.IMPORT_ERROR})"
    if device_type == "cuda" and not _ops.cuda_available_in_ext():
        return "iwm_fast._C was built without CUDA"
    return None


def _ijepa(batch_size, grid, num_targets, num_contexts, target_scale, target_aspect, context_scale,
           context_aspect, min_keep, allow_overlap, seed, step, max_tries, device):
    if device.type != "cpu":
        raise ValueError(f"backend='ijepa' (I-JEPA's loop) samples on the CPU, not on {device}")
    if num_contexts != 1 or tuple(context_aspect) != (1.0, 1.0) or allow_overlap:
        raise ValueError("backend='ijepa' takes what I-JEPA's collator does: num_contexts=1, context_aspect=(1, 1) "
                         "and allow_overlap=False")
    context, targets = ijepa_loop_masks(batch_size, grid, seed=seed, step=step, num_targets=num_targets,
                                        min_keep=min_keep, target_scale=target_scale, target_aspect=target_aspect,
                                        context_scale=context_scale, max_tries=max_tries)
    return context[:, None], targets


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
        device: where the index tensors are made.
        backend: one of ``BACKENDS`` (the module docstring says what each runs).
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
    check_backend("sample_block_masks", backend, BACKENDS)
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads <= 0):
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    grid3, ts, ta, cs, ca = check_args(batch_size, grid, num_targets, num_contexts, target_scale, target_aspect,
                                       context_scale, context_aspect, min_keep, seed, step, max_tries)
    device = torch.device(device)
    if backend == "ijepa":
        context, targets = _ijepa(batch_size, grid, num_targets, num_contexts, ts, ta, cs, ca, min_keep,
                                  allow_overlap, seed, step, max_tries, device)
    elif use_extension("sample_block_masks", backend, device, _extension_missing):
        context, targets = torch.ops.iwm_fast.sample_block_masks(
            torch.empty(0, device=device), batch_size, list(grid), num_targets, num_contexts, list(ts), list(ta),
            list(cs), list(ca), min_keep, allow_overlap, seed, step, max_tries, num_threads or 0)
    else:
        ut, uc = batch_uniforms(seed, step)
        target, context_ext = block_extent(ut, ts, ta, grid3), block_extent(uc, cs, ca, grid3)
        context, targets = sample_block_masks_python(batch_size, grid3, num_targets, num_contexts, target,
                                                     context_ext, min_keep, allow_overlap, seed, step, max_tries,
                                                     device)
    return (context[:, 0] if num_contexts == 1 else context), targets
