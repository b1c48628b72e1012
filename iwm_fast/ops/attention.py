"""Functional attention with selectable backends (layout [B, H, N, D], as in SDPA). Non-causal, or block-causal.

Backends:
- ``"triton"``: iwm-fast's fused kernel (``iwm_fast.kernels.attention``), registered below as the torch.library
  ops ``iwm_fast::attention_fwd`` / ``attention_bwd`` with fake implementations, so ``torch.compile(fullgraph=True)``
  traces modules that use it (the backward is itself an op, so the compiled backward graph calls it too).
  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks its own kernel).
- ``"eager"``: ``softmax(q k^T * scale) v`` with the score matrix materialised, as I-JEPA's own code does (the
  benchmark's baseline; also a readable reference).
- ``"flash_attn"`` / ``"xformers"``: the respective packages, when installed (no ``key_lengths``).
- ``"auto"``: triton on CUDA (sdpa for inputs the kernel does not take: float64 or D > 256, or without
  triton), sdpa elsewhere (``iwm_fast.ops.dispatch``).

``attention_qkv(qkv)`` takes q, k, v packed as one projection [B, N, 3, H, D]; with the Triton kernel its
backward writes the packed gradient directly (``iwm_fast::attention_qkv_fwd`` / ``_bwd``). The layers use it.

``key_lengths`` ([B] integer tensor, each in [0, Nk]) makes keys at index >= key_lengths[b] invisible to every
query of sample b, whatever they hold (NaN included); a sample with key length 0 gets a zero output and zero
gradients on every backend.

``block_causal`` (an int F >= 1, or None): query i sees key j only if j // F <= i // F, i.e. every token sees
all tokens of its own and earlier blocks of F tokens (V-JEPA 2-AC's frame-causal mask, F = action tokens +
patches per frame; F = 1 is ordinary causal attention). The Triton kernel skips the fully masked tiles; sdpa and
eager build the boolean mask; flash_attn and xformers do not take it. Rotary attention: ``iwm_fast.ops.rope``.
"""
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import ATTENTION as BACKENDS
from .dispatch import check_backend, use_triton

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256
# Looked up once: torch.compile(fullgraph=True) on torch 2.11 cannot trace find_spec inside the op.
_HAS = {name: importlib.util.find_spec(name) is not None for name in ("flash_attn", "xformers")}


# ---- validation ----------------------------------------------------------------------------------------

def check_block_causal(block_causal):
    if block_causal is None:
        return 0
    if isinstance(block_causal, bool) or not isinstance(block_causal, int):
        raise TypeError(f"attention: block_causal must be an int (tokens per block) or None, "
                        f"got {type(block_causal).__name__}")
    if block_causal < 1:
        raise ValueError(f"attention: block_causal must be >= 1 tokens per block, got {block_causal}")
    return block_causal


def check_layout(q, k, v, key_lengths=None):
    """Backend-independent checks of q, k, v ([B, H, N, D], one floating dtype, one device) and key_lengths."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have layout [B, H, N, D] (4 dims), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"attention: {name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError("attention: q [B, H, Nq, D] and k/v [B, H, Nk, D] must agree on B, H and D, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[3] == 0:
        raise ValueError("attention: head dim D must be at least 1, got 0")
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor):
            raise TypeError("attention: key_lengths must be an integer tensor of shape [B], "
                            f"got {type(key_lengths).__name__}")
        if key_lengths.dtype.is_floating_point or key_lengths.dtype.is_complex or key_lengths.dtype == torch.bool:
            raise TypeError(f"attention: key_lengths must be an integer tensor, got {key_lengths.dtype}")
        if key_lengths.shape != (q.shape[0],):
            raise ValueError(f"attention: key_lengths must have shape [B]=({q.shape[0]},), "
                             f"got {tuple(key_lengths.shape)}")
        if key_lengths.device != q.device:
            raise ValueError(f"attention: key_lengths is on {key_lengths.device} but q is on {q.device}")
        # A CPU tensor is checked for free; reading a CUDA one back would sync every call.
        if key_lengths.device.type == "cpu" and key_lengths.numel() and not torch.compiler.is_compiling():
            lo, hi = int(key_lengths.min()), int(key_lengths.max())
            if lo < 0 or hi > k.shape[2]:
                raise ValueError(f"attention: key_lengths must lie in [0, Nk={k.shape[2]}], got {lo if lo < 0 else hi}")


def _triton_takes(q):
    return q.dtype in _TRITON_DTYPES and q.shape[-1] <= _TRITON_MAX_HEAD_DIM


# ---- the Triton kernel as custom ops -------------------------------------------------------------------

@torch.library.custom_op("iwm_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, key_lengths: Optional[Tensor],
                  block_causal: int = 0) -> tuple[Tensor, Tensor]:
    from ..kernels.attention import attention_forward  # imports triton: only when the kernel runs

    return attention_forward(q, k, v, scale, key_lengths, block_causal)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, key_lengths, block_causal=0):
    B, H, Nq, D = q.shape
    # Same memory layout as the real kernel's output: [B, Nq, H, D] viewed as [B, H, Nq, D].
    out = q.new_empty((B, Nq, H, D)).transpose(1, 2)
    lse = q.new_empty((B, H, Nq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("iwm_fast::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                  key_lengths: Optional[Tensor], block_causal: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, scale, key_lengths, block_causal)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, scale, key_lengths, block_causal=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, key_lengths, block_causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)
    ctx.scale = scale
    ctx.block_causal = block_causal


def _backward(ctx, grad_out, grad_lse):
    # The LSE is an internal by-product (never returned by the public API), so its gradient is ignored.
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, key_lengths, ctx.block_causal)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def split_qkv(qkv):
    """q, k, v [B, H, N, D] as views of a packed projection qkv [B, N, 3, H, D] (the qkv linear's output)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("iwm_fast::attention_qkv_fwd", mutates_args=())
def attention_qkv_fwd(qkv: Tensor, scale: float, key_lengths: Optional[Tensor],
                      block_causal: int = 0) -> tuple[Tensor, Tensor]:
    from ..kernels.attention import attention_forward

    return attention_forward(*split_qkv(qkv), scale, key_lengths, block_causal)


@attention_qkv_fwd.register_fake
def _attention_qkv_fwd_fake(qkv, scale, key_lengths, block_causal=0):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H, D)).transpose(1, 2), qkv.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("iwm_fast::attention_qkv_bwd", mutates_args=())
def attention_qkv_bwd(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float,
                      key_lengths: Optional[Tensor], block_causal: int = 0) -> Tensor:
    """The gradient of qkv [B, N, 3, H, D], written by the kernels straight into its three slices."""
    from ..kernels.attention import attention_backward

    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    attention_backward(grad_out, *split_qkv(qkv), out, lse, scale, key_lengths, block_causal,
                       grads=split_qkv(dqkv))
    return dqkv


@attention_qkv_bwd.register_fake
def _attention_qkv_bwd_fake(grad_out, qkv, out, lse, scale, key_lengths, block_causal=0):
    return qkv.new_empty(qkv.shape)


def _qkv_setup_context(ctx, inputs, output):
    qkv, scale, key_lengths, block_causal = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, key_lengths)
    ctx.scale = scale
    ctx.block_causal = block_causal


def _qkv_backward(ctx, grad_out, grad_lse):
    qkv, out, lse, key_lengths = ctx.saved_tensors
    return attention_qkv_bwd(grad_out, qkv, out, lse, ctx.scale, key_lengths, ctx.block_causal), None, None, None


attention_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


# ---- backends ------------------------------------------------------------------------------------------

def _check_triton(q):
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"attention: backend='triton' supports float16, bfloat16 and float32, got {q.dtype}")
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        raise ValueError(f"attention: backend='triton' supports head dims up to {_TRITON_MAX_HEAD_DIM}, "
                         f"got D={q.shape[-1]}; use backend='sdpa'")
    use_triton("attention", "triton", q.device)  # raises with the reason when the kernel cannot run here


def _run_triton(q, k, v, scale, key_lengths, block_causal=0):
    _check_triton(q)
    out, _ = attention_fwd(q, k, v, float(scale), key_lengths, block_causal)
    return out


def block_causal_mask(n_q, n_k, block, device=None):
    """[Nq, Nk] bool, True where query i sees key j: j // block <= i // block."""
    i = torch.arange(n_q, device=device)[:, None] // block
    return torch.arange(n_k, device=device)[None, :] // block <= i


def _visible_keys(q, k, key_lengths):
    """([B, 1, 1, Nk] bool mask of visible keys, [B] bool has-any-key), or (None, None) without key_lengths."""
    if key_lengths is None:
        return None, None
    kl = key_lengths.to(device=q.device, dtype=torch.long)
    visible = torch.arange(k.shape[-2], device=q.device)[None, :] < kl[:, None]
    return visible[:, None, None, :], kl > 0


def _hide_keys(k, v, visible):
    # Hidden keys must not reach the softmax's arithmetic at all: a NaN there (padding, a dropped token) would
    # poison every row through 0 * NaN, which the Triton kernel never computes.
    return k.masked_fill(~visible.transpose(-1, -2), 0), v.masked_fill(~visible.transpose(-1, -2), 0)


def _full_mask(q, k, key_lengths, block_causal):
    """(bool mask broadcastable to [B, H, Nq, Nk] or None, visible keys, has-any-key), see _visible_keys.

    Every row of the mask sees at least key 0: a sample without keys is given all keys (its output is zeroed
    afterwards) and the block-causal mask always shows the first block."""
    visible, has_keys = _visible_keys(q, k, key_lengths)
    mask = None if visible is None else visible | ~has_keys[:, None, None, None]
    if block_causal:
        causal = block_causal_mask(q.shape[-2], k.shape[-2], block_causal, q.device)
        mask = causal if mask is None else mask & causal
    return mask, visible, has_keys


def _zero_keyless(out, has_keys):
    return out if has_keys is None else out * has_keys.to(out.dtype)[:, None, None, None]


def _run_sdpa(q, k, v, scale, key_lengths, block_causal=0):
    mask, visible, has_keys = _full_mask(q, k, key_lengths, block_causal)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if visible is not None:
        k, v = _hide_keys(k, v, visible)
    # A sample without keys would make SDPA's softmax 0/0 = NaN (and NaN gradients); it attends to
    # everything instead and its output is zeroed, which also zeroes its gradients.
    return _zero_keyless(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), has_keys)


def _run_eager(q, k, v, scale, key_lengths, block_causal=0):
    mask, visible, has_keys = _full_mask(q, k, key_lengths, block_causal)
    if mask is None:
        return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v
    if visible is not None:
        k, v = _hide_keys(k, v, visible)
    scores = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~mask, float("-inf"))
    return _zero_keyless(scores.softmax(dim=-1) @ v, has_keys)


def _run_flash_attn(q, k, v, scale, key_lengths, block_causal=0):
    if not _HAS["flash_attn"]:
        raise RuntimeError("attention: backend='flash_attn' needs the flash-attn package (pip install flash-attn)")
    if block_causal:
        raise ValueError("attention: backend='flash_attn' does not take block_causal; use 'triton' or 'sdpa'")
    if key_lengths is not None:
        raise ValueError("attention: backend='flash_attn' does not take key_lengths; use 'triton' or 'sdpa'")
    from flash_attn import flash_attn_func

    # flash-attn wants [B, N, H, D]; the transposes are views (its last dim must be contiguous).
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)


def _run_xformers(q, k, v, scale, key_lengths, block_causal=0):
    if not _HAS["xformers"]:
        raise RuntimeError("attention: backend='xformers' needs the xformers package (pip install xformers)")
    if block_causal:
        raise ValueError("attention: backend='xformers' does not take block_causal; use 'triton' or 'sdpa'")
    if key_lengths is not None:
        raise ValueError("attention: backend='xformers' does not take key_lengths; use 'triton' or 'sdpa'")
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


_RUNNERS = {"triton": _run_triton, "sdpa": _run_sdpa, "eager": _run_eager, "flash_attn": _run_flash_attn,
            "xformers": _run_xformers}


def _resolve(backend, q):
    if backend == "auto":
        return "triton" if use_triton("attention", "auto", q.device, supported=_triton_takes(q)) else "sdpa"
    return backend


def attention(q, k, v, *, scale=None, key_lengths=None, block_causal=None, backend="auto"):
    """softmax(q @ k^T * scale) @ v over [B, H, N, D] tensors; ``scale`` defaults to D ** -0.5.

    ``block_causal=F``: query i sees key j only if j // F <= i // F (see the module docstring)."""
    check_backend("attention", backend, BACKENDS)
    check_layout(q, k, v, key_lengths)
    block = check_block_causal(block_causal)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _RUNNERS[_resolve(backend, q)](q, k, v, scale, key_lengths, block)


def attention_qkv(qkv, *, scale=None, key_lengths=None, block_causal=None, backend="auto"):
    """``attention`` of the q, k, v packed in one projection ``qkv`` [B, N, 3, H, D] (the qkv linear's output
    viewed so); returns [B, H, N, D] as ``attention`` does.

    With the Triton kernel the backward writes the packed gradient [B, N, 3, H, D] itself, so autograd neither
    stacks dq, dk, dv nor copies them back into the projection's layout (two passes over 3 x [B, N, C] each)."""
    check_backend("attention_qkv", backend, BACKENDS)
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("attention_qkv: qkv must be a [B, N, 3, H, D] tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    q, k, v = split_qkv(qkv)
    check_layout(q, k, v, key_lengths)
    block = check_block_causal(block_causal)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    backend = _resolve(backend, q)
    if backend != "triton":
        return _RUNNERS[backend](q, k, v, scale, key_lengths, block)
    _check_triton(q)
    out, _ = attention_qkv_fwd(qkv, float(scale), key_lengths, block)
    return out
