"""Rotary position embeddings (RoPE) with per-token positions on 1, 2 or 3 axes, and rotary attention.

Channels: each axis a owns ``axes[a]`` consecutive channels of a head (an even count), the axes in order from
channel 0; channels past their sum are left unrotated. Within an axis of d channels (half = d / 2), the
frequencies are omega_f = 1 / base ** (f / half), f < half, and channel j is rotated with its pair partner j ^ 1
by the angle pos * omega, where the frequency index is:

- ``layout="vjepa2"``: f = j mod half, V-JEPA 2's layout as released (its half-frequencies repeated across the
  vector, so the two channels of a pair turn by different angles; its checkpoints were trained with it);
- ``layout="interleaved"``: f = j // 2, the standard interleaved RoPE (both channels of a pair by one angle).

y_j = x_j cos(theta_j) - x_(j+1) sin(theta_j) for even j, y_j = x_j cos(theta_j) + x_(j-1) sin(theta_j) for odd j.
V-JEPA 2's presets: ``vjepa2_axes(head_dim)`` = three axes (depth, height, width) of 2 * ((head_dim // 3) // 2)
channels each (head dim 64: 20 + 20 + 20, 4 unrotated).

Positions ``pos`` are [N, A] or [B, N, A] (A = len(axes), any real dtype, computed in float32), so a masked
subset of tokens rotates by its true grid positions. They take no gradient.

Backends: ``triton`` runs one fused pass (``kernels/rope.py``; the ``iwm_fast::rope`` op for one tensor,
``iwm_fast::rope_qk`` for q and k in one launch; each op's backward is the transposed rotation, the same op),
``torch`` the same arithmetic in PyTorch (float32 angles, as V-JEPA 2 in float32), ``auto`` triton on CUDA.
``rope_attention`` rotates q and k (one launch for both) and then runs ``ops.attention``.
"""
from typing import Optional

import torch
from torch import Tensor

from ..backends import ATTENTION as ATTENTION_BACKENDS
from ..backends import ROPE as BACKENDS
from .attention import _triton_takes, attention, check_block_causal, check_layout
from .dispatch import check_backend, use_triton

LAYOUTS = ("vjepa2", "interleaved")
_TABLES = {}


def vjepa2_axes(head_dim, n_axes=3):
    """V-JEPA 2's channel split: ``n_axes`` axes of 2 * ((head_dim // 3) // 2) channels each."""
    return (2 * ((head_dim // 3) // 2),) * n_axes


def grid_positions(ids, grid):
    """Float32 positions [..., len(grid)] of flat token indices ``ids`` on a row-major grid: (N,), (H, W) or
    (T, H, W). For ``rope``'s ``pos``: a masked subset's indices give its tokens' true grid positions."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError("grid_positions: ids must be an integer tensor of flat token indices")
    out, rest = [], ids
    for size in reversed(tuple(grid)[1:]):
        out.append(rest % size)
        rest = rest // size
    out.append(rest)
    return torch.stack(out[::-1], dim=-1).to(torch.float32)


# ---- validation ----------------------------------------------------------------------------------------

def _check_axes(axes, head_dim, layout, base):
    if layout not in LAYOUTS:
        raise ValueError(f"rope: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not isinstance(axes, (tuple, list)) or not axes:
        raise TypeError(f"rope: axes must be a non-empty tuple of channel counts per axis, got {axes!r}")
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or a < 0 or a % 2:
            raise ValueError(f"rope: each axis must own an even, non-negative number of channels, got axes={axes!r}")
    if sum(axes) > head_dim:
        raise ValueError(f"rope: axes {tuple(axes)} own {sum(axes)} channels, more than the head dim {head_dim}")
    if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 0:
        raise ValueError(f"rope: base must be a positive number, got {base!r}")


def _check_pos(pos, x, n_axes):
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"rope: pos must be a tensor of positions [N, A] or [B, N, A], got {type(pos).__name__}")
    if pos.dtype == torch.bool or pos.is_complex():
        raise TypeError(f"rope: pos must hold real numbers, got {pos.dtype}")
    B, _, N, _ = x.shape
    if pos.dim() == 2:
        pos = pos[None]
    if pos.dim() != 3 or pos.shape[1:] != (N, n_axes) or pos.shape[0] not in (1, B):
        raise ValueError(f"rope: pos must have shape [N={N}, A={n_axes}] or [B={B}, N, A], got {tuple(pos.shape)}")
    if pos.device != x.device:
        raise ValueError(f"rope: pos is on {pos.device} but the tensors are on {x.device}")
    return pos.to(torch.float32).contiguous()


# ---- channel tables ------------------------------------------------------------------------------------

def _build_tables(head_dim, axes, layout, base, device):
    axis = torch.zeros(head_dim, dtype=torch.int32, device=device)
    inv_freq = torch.zeros(head_dim, dtype=torch.float32, device=device)
    start = 0
    for a, d in enumerate(axes):
        if d == 0:
            continue
        half = d // 2
        # As V-JEPA 2 computes it in float32 (same ops, same device), so the angles match it bit for bit.
        omega = 1.0 / base ** (torch.arange(half, dtype=torch.float32, device=device) / float(half))
        j = torch.arange(d, device=device)
        inv_freq[start:start + d] = omega[j % half if layout == "vjepa2" else j // 2]
        axis[start:start + d] = a
        start += d
    return axis, inv_freq


def rope_tables(head_dim, axes, layout="vjepa2", base=10000.0, device="cpu"):
    """(axis [D] int32, inv_freq [D] float32): each channel's axis and inverse frequency (0 = unrotated)."""
    key = (head_dim, tuple(axes), layout, float(base), str(device))
    if torch.compiler.is_compiling():
        return _build_tables(head_dim, tuple(axes), layout, base, device)
    if key not in _TABLES:
        _TABLES[key] = _build_tables(head_dim, tuple(axes), layout, base, device)
    return _TABLES[key]


# ---- the rotation: PyTorch and the Triton kernel as a custom op ----------------------------------------

def _rope_torch(x, pos, axis, inv_freq):
    """The rotation in PyTorch (autograd gives its transpose): float32 angles, as V-JEPA 2 computes them."""
    D = x.shape[-1]
    channels = torch.arange(D, device=x.device)
    partner = torch.where((channels ^ 1) < D, channels ^ 1, channels)  # odd D: the last channel has no partner
    theta = pos[:, None].index_select(-1, axis.long()) * inv_freq  # [B or 1, 1, N, D]
    sign = torch.where(channels % 2 == 0, -1.0, 1.0)
    xf = x.float()
    return (xf * theta.cos() + xf.index_select(-1, partner) * sign * theta.sin()).to(x.dtype)


@torch.library.custom_op("iwm_fast::rope", mutates_args=())
def rope_op(x: Tensor, pos: Tensor, axis: Tensor, inv_freq: Tensor, transpose: bool) -> Tensor:
    from ..kernels.rope import rope_apply  # imports triton: only when the kernel runs

    return rope_apply(x, pos, axis, inv_freq, transpose)


def _kernel_layout(x):
    B, H, N, D = x.shape
    return x.new_empty((B, N, H, D)).transpose(1, 2)  # the kernel's layout: [B, N, H, D] viewed as [B, H, N, D]


@rope_op.register_fake
def _rope_fake(x, pos, axis, inv_freq, transpose):
    return _kernel_layout(x)


def _rope_setup(ctx, inputs, output):
    _, pos, axis, inv_freq, transpose = inputs
    ctx.save_for_backward(pos, axis, inv_freq)
    ctx.transpose = transpose


def _rope_backward(ctx, grad):
    pos, axis, inv_freq = ctx.saved_tensors
    return rope_op(grad, pos, axis, inv_freq, not ctx.transpose), None, None, None, None


rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


@torch.library.custom_op("iwm_fast::rope_qk", mutates_args=())
def rope_qk_op(q: Tensor, k: Tensor, pos: Tensor, axis: Tensor, inv_freq: Tensor,
               transpose: bool) -> tuple[Tensor, Tensor]:
    """q and k ([B, H, N, D], same shape) rotated in one launch: the angles are computed once for both."""
    from ..kernels.rope import rope_apply

    return rope_apply(q, pos, axis, inv_freq, transpose, x2=k)


@rope_qk_op.register_fake
def _rope_qk_fake(q, k, pos, axis, inv_freq, transpose):
    return _kernel_layout(q), _kernel_layout(k)


def _rope_qk_backward(ctx, grad_q, grad_k):
    pos, axis, inv_freq = ctx.saved_tensors
    dq, dk = rope_qk_op(grad_q, grad_k, pos, axis, inv_freq, not ctx.transpose)
    return dq, dk, None, None, None, None


def _rope_qk_setup(ctx, inputs, output):
    _, _, pos, axis, inv_freq, transpose = inputs
    ctx.save_for_backward(pos, axis, inv_freq)
    ctx.transpose = transpose


rope_qk_op.register_autograd(_rope_qk_backward, setup_context=_rope_qk_setup)


def _rotate(x, pos, axis, inv_freq, triton):
    if triton:
        return rope_op(x, pos, axis, inv_freq, False)
    return _rope_torch(x, pos, axis, inv_freq)


# ---- public functions ----------------------------------------------------------------------------------

def _prepare(x, pos, axes, layout, base):
    _check_axes(axes, x.shape[-1], layout, base)
    pos = _check_pos(pos, x, len(axes))
    axis, inv_freq = rope_tables(x.shape[-1], axes, layout, base, x.device)
    return pos, axis, inv_freq


def apply_rope(x, pos, *, axes, layout="vjepa2", base=10000.0, backend="auto"):
    """x [B, H, N, D] rotated by per-token positions ``pos`` ([N, A] or [B, N, A]); see the module docstring."""
    check_backend("apply_rope", backend, BACKENDS)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
        raise TypeError("apply_rope: x must be a floating-point tensor [B, H, N, D]")
    pos, axis, inv_freq = _prepare(x, pos, axes, layout, base)
    triton = backend != "torch" and use_triton("apply_rope", backend, x.device, supported=_triton_takes(x))
    return _rotate(x, pos, axis, inv_freq, triton)


def rope_attention(q, k, v, pos, *, axes, layout="vjepa2", base=10000.0, scale=None,
                   key_lengths: Optional[Tensor] = None, block_causal=None, backend="auto"):
    """attention(rope(q), rope(k), v): self-attention of N tokens at positions ``pos`` ([N, A] or [B, N, A]).

    ``backend`` is the attention's (``ops.attention``); the rotation runs the Triton kernel whenever the
    attention does, and PyTorch otherwise. ``scale``, ``key_lengths`` and ``block_causal`` as in attention."""
    check_backend("rope_attention", backend, ATTENTION_BACKENDS)
    check_layout(q, k, v, key_lengths)
    check_block_causal(block_causal)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"rope_attention: q and k must hold the same tokens (self-attention), got Nq={q.shape[2]} "
                         f"and Nk={k.shape[2]}")
    pos, axis, inv_freq = _prepare(q, pos, axes, layout, base)
    if backend == "auto":
        backend = "triton" if use_triton("attention", "auto", q.device, supported=_triton_takes(q)) else "sdpa"
    if backend == "triton":
        q, k = rope_qk_op(q, k, pos, axis, inv_freq, False)
    else:
        q, k = _rope_torch(q, pos, axis, inv_freq), _rope_torch(k, pos, axis, inv_freq)
    return attention(q, k, v, scale=scale, key_lengths=key_lengths, block_causal=block_causal, backend=backend)
