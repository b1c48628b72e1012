"""Functional ops of iwm-fast: each picks a fused Triton kernel where it can and a PyTorch path otherwise."""
from .attention import attention
from .ema import ema_update_
from .gather import apply_masks, masked_gather
from .rope import apply_rope, grid_positions, rope_attention, vjepa2_axes

__all__ = ["attention", "rope_attention", "apply_rope", "grid_positions", "vjepa2_axes", "masked_gather",
           "apply_masks", "ema_update_"]
