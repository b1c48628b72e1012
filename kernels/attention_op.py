"""The Triton attention kernels as torch.library custom ops with fake (meta) kernels and autograd.

Registering ``iwm_fast::attention_fwd`` / ``iwm_fast::attention_bwd`` lets ``torch.compile`` (dynamo +
AOTAutograd) trace modules that use the kernel with ``fullgraph=True``: the fake kernels give output shapes
and strides without running anything, and the backward is itself an op, so the compiled backward graph
calls it too. Triton is imported only when a kernel actually runs, so importing this module is cheap and
works without triton.
"""
from typing import Optional

import torch
from torch import Tensor


@torch.library.custom_op("iwm_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float,
                  key_lengths: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    from .attention import attention_forward

    return attention_forward(q, k, v, scale, key_lengths)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, key_lengths):
    B, H, Nq, D = q.shape
    # Same memory layout as the real kernel's output: [B, Nq, H, D] viewed as [B, H, Nq, D].
    out = q.new_empty((B, Nq, H, D)).transpose(1, 2)
    lse = q.new_empty((B, H, Nq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("iwm_fast::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                  key_lengths: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    from .attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, scale, key_lengths)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, scale, key_lengths):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, key_lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    # The LSE is an internal by-product (never returned by the public API), so its gradient is ignored.
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, key_lengths)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_attention(q, k, v, scale, key_lengths=None):
    """Differentiable fused attention on [B, H, N, D] tensors; returns the output only."""
    out, _ = attention_fwd(q, k, v, float(scale), key_lengths)
    return out
