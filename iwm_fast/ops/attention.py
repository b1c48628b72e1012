"""Functional attention with selectable backends (layout [B, H, N, D], as in SDPA). Non-causal.

Backends:
- ``"triton"``: iwm-fast's fused kernel (kernels/attention.py), registered as a torch.library op so
  ``torch.compile(fullgraph=True)`` traces it. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks its own kernel).
- ``"flash_attn"`` / ``"xformers"``: the respective packages, when installed (no ``key_lengths``).
- ``"auto"``: triton on CUDA (falling back to sdpa for inputs the kernel does not take: float64 or
  D > 256, or when triton is missing), sdpa on the CPU.

``key_lengths`` ([B] integer tensor) makes keys at index >= key_lengths[b] invisible to every query of
sample b; a sample with key length 0 gets a zero output and zero gradients on every backend.
"""
import importlib.util

import torch
import torch.nn.functional as F

from ..kernels.attention import check_layout
from ..kernels.attention_op import triton_attention

BACKENDS = ("auto", "triton", "sdpa", "flash_attn", "xformers")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256


def _triton_available():
    return importlib.util.find_spec("triton") is not None


def _triton_takes(q):
    return q.dtype in _TRITON_DTYPES and q.shape[-1] <= _TRITON_MAX_HEAD_DIM


def _run_triton(q, k, v, scale, key_lengths):
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"attention: backend='triton' supports float16, bfloat16 and float32, got {q.dtype}")
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        raise ValueError(f"attention: backend='triton' supports head dims up to {_TRITON_MAX_HEAD_DIM}, "
                         f"got D={q.shape[-1]}; use backend='sdpa'")
    if not _triton_available():
        raise RuntimeError("attention: backend='triton' needs the triton package (pip install triton)")
    return triton_attention(q, k, v, scale, key_lengths)


def _run_sdpa(q, k, v, scale, key_lengths):
    if key_lengths is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    kl = key_lengths.to(device=q.device, dtype=torch.long)
    has_keys = kl > 0
    # A sample without keys would make SDPA's softmax 0/0 = NaN (and NaN gradients); let it attend to
    # everything instead and zero its output, which also zeroes its gradients.
    visible = torch.arange(k.shape[-2], device=q.device)[None, :] < kl[:, None]
    visible = visible | ~has_keys[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)
    return out * has_keys.to(out.dtype)[:, None, None, None]


def _run_flash_attn(q, k, v, scale, key_lengths):
    if importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError("attention: backend='flash_attn' needs the flash-attn package (pip install flash-attn)")
    if key_lengths is not None:
        raise ValueError("attention: backend='flash_attn' does not take key_lengths; use 'triton' or 'sdpa'")
    from flash_attn import flash_attn_func

    # flash-attn wants [B, N, H, D]; the transposes are views (its last dim must be contiguous).
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)


def _run_xformers(q, k, v, scale, key_lengths):
    if importlib.util.find_spec("xformers") is None:
        raise RuntimeError("attention: backend='xformers' needs the xformers package (pip install xformers)")
    if key_lengths is not None:
        raise ValueError("attention: backend='xformers' does not take key_lengths; use 'triton' or 'sdpa'")
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


_RUNNERS = {"triton": _run_triton, "sdpa": _run_sdpa, "flash_attn": _run_flash_attn, "xformers": _run_xformers}


def attention(q, k, v, *, scale=None, key_lengths=None, backend="auto"):
    """softmax(q @ k^T * scale) @ v over [B, H, N, D] tensors; ``scale`` defaults to D ** -0.5."""
    if backend not in BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_layout(q, k, v, key_lengths)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "auto":
        use_triton = q.device.type == "cuda" and _triton_takes(q) and _triton_available()
        backend = "triton" if use_triton else "sdpa"
    return _RUNNERS[backend](q, k, v, scale, key_lengths)
