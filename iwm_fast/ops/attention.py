"""Functional attention with selectable backends (layout [B, H, N, D], as in SDPA).

Placeholder: only the SDPA backend so far; the Triton backend lands with the fused-attention issue.
"""
import torch
import torch.nn.functional as F


def attention(q, k, v, *, scale=None, key_lengths=None, backend="auto"):
    if backend not in ("auto", "sdpa"):
        raise NotImplementedError(f"attention backend {backend!r} is not available yet")
    mask = None
    if key_lengths is not None:
        mask = torch.arange(k.shape[-2], device=k.device)[None, :] < key_lengths.to(k.device)[:, None]
        mask = mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
