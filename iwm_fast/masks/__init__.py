"""I-JEPA multi-block masks: the sampler (C++/CUDA op with a vectorised PyTorch fallback) and the collator."""
from .collator import MultiBlockMaskCollator
from .extents import Extent, block_extent
from .sampler import sample_block_masks

__all__ = ["sample_block_masks", "MultiBlockMaskCollator", "block_extent", "Extent"]
