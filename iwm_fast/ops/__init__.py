"""Functional ops of iwm-fast: each picks a fused Triton kernel where it can and a PyTorch path otherwise."""
from .attention import attention
from .ema import ema_update_
from .gather import apply_masks, masked_gather

__all__ = ["attention", "masked_gather", "apply_masks", "ema_update_"]
