"""Loads the C++/CUDA op ``torch.ops.iwm_fast.sample_block_masks`` (iwm_fast._C) and registers its fake."""
import torch

try:
    from iwm_fast import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)

    HAS_EXT = hasattr(torch.ops.iwm_fast, "sample_block_masks")
    IMPORT_ERROR = None
except ImportError as exc:  # built without the extension (IWM_FAST_NO_EXT=1) or not built yet
    HAS_EXT = False
    IMPORT_ERROR = exc


def cuda_available_in_ext() -> bool:
    """Whether the built op has a CUDA implementation."""
    return HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key("iwm_fast::sample_block_masks", "CUDA")


def cpu_vector_path() -> str:
    """The C++ CPU sampler's vector path: ``avx512``, ``avx2`` or ``portable`` (same masks on every path)."""
    if not HAS_EXT:
        raise RuntimeError(f"iwm_fast._C is not built ({IMPORT_ERROR})")
    return torch.ops.iwm_fast.cpu_vector_path()


def set_cpu_vector_path(path: str) -> None:
    """Cap the C++ CPU sampler's vector path for this process (``avx512``, ``avx2`` or ``portable``); the
    environment variable ``IWM_FAST_MASKS_SIMD`` sets the initial cap. For benchmarks and debugging."""
    if not HAS_EXT:
        raise RuntimeError(f"iwm_fast._C is not built ({IMPORT_ERROR})")
    torch.ops.iwm_fast.set_cpu_vector_path(path)


if HAS_EXT:

    @torch.library.register_fake("iwm_fast::sample_block_masks")
    def _fake(anchor, batch_size, grid, num_targets, num_contexts, target_scale, target_aspect, context_scale,
              context_aspect, min_keep, allow_overlap, seed, step, max_tries, num_threads):
        # Both lengths depend on (seed, step) and, for the context, on the sampled layout: unbacked sizes.
        ctx = torch.library.get_ctx()
        keep = ctx.new_dynamic_size(min=min_keep)
        target_len = ctx.new_dynamic_size(min=max(min_keep, 1))
        return (anchor.new_empty((batch_size, num_contexts, keep), dtype=torch.long),
                anchor.new_empty((batch_size, num_targets, target_len), dtype=torch.long))
