"""Rotary position embedding of q or k ([B, H, N, D], any strides) in one Triton pass, and its transpose.

Channel c of a head is rotated by the angle theta_c = pos[b, n, axis(c)] * inv_freq[c] together with its pair
partner c ^ 1:  y_c = x_c * cos(theta_c) + sign_c * x_(c^1) * sin(theta_c), sign = -1 for even c, +1 for odd c.
The host builds the per-channel tables (axis of each channel and its inverse frequency, 0 for the unrotated
remainder, whose angle 0 makes y_c = x_c exactly), so one kernel serves 1-D/2-D/3-D axes and both frequency
layouts (V-JEPA 2's, where theta_c and theta_(c^1) differ, and the interleaved one, where they are equal).

The map is linear but, in V-JEPA 2's layout, not orthogonal, so the backward is the transpose, not the inverse:
dx_c = g_c * cos(theta_c) - sign_c * g_(c^1) * sin(theta_(c^1)).

Why a separate pass and not a rotation inside the attention kernel's tile loads: see docs/dropin.md ("Rotary
attention: one fused rotary pass, then the attention kernel").
"""
import triton
import triton.language as tl

from .attention import _interpreting


def _block_rows(d):
    # About 2K elements per tile: with cos and sin kept in registers across the head loop (2 x 16 fp32 per thread
    # at 4 warps) plus x and its partner, no spills; B * N / rows programs fill the GPU at V-JEPA 2's sizes.
    return max(1, min(64, 2048 // triton.next_power_of_2(d)))


@triton.jit
def _rope_kernel(X, Y, POS, AXIS, INV_FREQ,
                 stride_xb, stride_xh, stride_xn, stride_xd,
                 stride_yb, stride_yh, stride_yn, stride_yd,
                 stride_pb, stride_pn, stride_pa,
                 H, N,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSE: tl.constexpr):
    # One program per (sample, block of tokens), looping over the heads: every head of a token turns by the same
    # angles, so the sines and cosines are computed once for all heads.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    b = (pid // n_tiles).to(tl.int64)
    rows = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    partner = cols ^ 1
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
    ok_p = row_ok[:, None] & (partner < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)

    pos_base = POS + b * stride_pb + rows64[:, None] * stride_pn
    axis = tl.load(AXIS + cols, mask=cols < HEAD_DIM, other=0)
    inv_freq = tl.load(INV_FREQ + cols, mask=cols < HEAD_DIM, other=0.0)
    theta = tl.load(pos_base + axis[None, :] * stride_pa, mask=ok, other=0.0) * inv_freq[None, :]
    cos = tl.cos(theta)
    # sign_c: -1 for even c (y_c = x_c cos - x_(c+1) sin), +1 for odd c.
    sign = tl.where((cols % 2) == 0, -1.0, 1.0)[None, :]
    if TRANSPOSE:  # dx_c = g_c cos(theta_c) - sign_c g_(c^1) sin(theta_(c^1))
        axis_p = tl.load(AXIS + partner, mask=partner < HEAD_DIM, other=0)
        inv_freq_p = tl.load(INV_FREQ + partner, mask=partner < HEAD_DIM, other=0.0)
        theta_p = tl.load(pos_base + axis_p[None, :] * stride_pa, mask=ok_p, other=0.0) * inv_freq_p[None, :]
        sin = -sign * tl.sin(theta_p)
    else:
        sin = sign * tl.sin(theta)

    for h in range(0, H):
        x_base = X + b * stride_xb + h * stride_xh + rows64[:, None] * stride_xn
        x = tl.load(x_base + cols[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
        # The partner column of the same rows: the same cache lines as x, so no extra DRAM traffic.
        xp = tl.load(x_base + partner[None, :] * stride_xd, mask=ok_p, other=0.0).to(tl.float32)
        y = x * cos + xp * sin
        y_ptrs = Y + b * stride_yb + h * stride_yh + rows64[:, None] * stride_yn + cols[None, :] * stride_yd
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=ok)


def rope_apply(x, pos, axis, inv_freq, transpose=False, out=None):
    """Rotate x [B, H, N, D] by pos [B or 1, N, A] (float32) with the channel tables axis [D] (int32) and
    inv_freq [D] (float32). Returns a new tensor laid out [B, N, H, D] (or writes ``out``)."""
    B, H, N, D = x.shape
    if out is None:
        out = x.new_empty((B, N, H, D)).transpose(1, 2)
    if x.numel() == 0:
        return out
    block_n = _block_rows(D) if not _interpreting() else 16
    stride_pb = pos.stride(0) if pos.shape[0] != 1 else 0
    grid = (triton.cdiv(N, block_n) * B,)
    _rope_kernel[grid](x, out, pos, axis, inv_freq, *x.stride(), *out.stride(), stride_pb, pos.stride(1),
                       pos.stride(2), H, N, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_N=block_n,
                       TRANSPOSE=transpose)
    return out
