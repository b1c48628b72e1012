"""Rotary position embedding of q and k ([B, H, N, D], any strides) in one Triton pass, and its transpose.

Channel c of a head is rotated by the angle theta_c = pos[b, n, axis(c)] * inv_freq[c] together with its pair
partner c ^ 1:  y_c = x_c * cos(theta_c) + sign_c * x_(c^1) * sin(theta_c), sign = -1 for even c, +1 for odd c.
The host builds the per-channel tables (axis of each channel and its inverse frequency, 0 for the unrotated
remainder, whose angle 0 makes y_c = x_c exactly), so one kernel serves 1-D/2-D/3-D axes and both frequency
layouts (V-JEPA 2's, where theta_c and theta_(c^1) differ, and the interleaved one, where they are equal).

The map is linear but, in V-JEPA 2's layout, not orthogonal, so the backward is the transpose, not the inverse:
dx_c = g_c * cos(theta_c) - sign_c * g_(c^1) * sin(theta_(c^1)).

One program per (sample, block of tokens) computes the sines and cosines of its tokens once and turns every
head of q and then of k with them (q and k share positions: one launch, not two, and half the trig). A row of
a head is loaded whole (16-byte vectors) and split into its even and odd channels in registers
(``tl.split``), so the partner of a channel is never loaded on its own (which compiled to 2-byte loads).

Why a separate pass and not a rotation inside the attention kernel's tile loads: see docs/dropin.md ("Rotary
attention: one fused rotary pass, then the attention kernel").
"""
import triton
import triton.language as tl

from .attention import _interpreting, _row_align


def block_rows(d):
    # About 2K elements per tile: the four trig tables of the tile stay in registers across the head loops
    # (4 x 8 fp32 per thread at 4 warps), next to a row tile and its two halves; B * N / rows programs fill the
    # GPU at V-JEPA 2's sizes.
    return max(1, min(64, 2048 // triton.next_power_of_2(d)))


@triton.jit
def _turn_heads(X, Y, b, rows64, ok, H, stride_xb, stride_xh, stride_xn, stride_xd,
                stride_yb, stride_yh, stride_yn, stride_yd, cos_e, sin_e, cos_o, sin_o,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSE: tl.constexpr, ALIGN: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    x_rows = tl.multiple_of(rows64 * stride_xn, ALIGN)[:, None] + cols[None, :] * stride_xd
    y_rows = tl.multiple_of(rows64 * stride_yn, ALIGN)[:, None] + cols[None, :] * stride_yd
    for h in range(0, H):
        x_ptrs = X + tl.multiple_of(b * stride_xb + h * stride_xh, ALIGN) + x_rows
        x = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
        x_e, x_o = tl.split(tl.reshape(x, [BLOCK_N, BLOCK_D // 2, 2]))
        if TRANSPOSE:  # dx_e = g_e cos_e + g_o sin_o, dx_o = g_o cos_o - g_e sin_e
            y_e = x_e * cos_e + x_o * sin_o
            y_o = x_o * cos_o - x_e * sin_e
        else:  # y_e = x_e cos_e - x_o sin_e, y_o = x_o cos_o + x_e sin_o
            y_e = x_e * cos_e - x_o * sin_e
            y_o = x_o * cos_o + x_e * sin_o
        y = tl.reshape(tl.join(y_e, y_o), [BLOCK_N, BLOCK_D])
        y_ptrs = Y + tl.multiple_of(b * stride_yb + h * stride_yh, ALIGN) + y_rows
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _angles(POS, AXIS, INV_FREQ, pos_base, row_ok, stride_pa, first, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """theta of channels first, first + 2, ... (the even or the odd ones): [BLOCK_N, HALF]."""
    chans = first + 2 * tl.arange(0, HALF)
    in_head = chans < HEAD_DIM
    axis = tl.load(AXIS + chans, mask=in_head, other=0)
    inv_freq = tl.load(INV_FREQ + chans, mask=in_head, other=0.0)
    pos = tl.load(pos_base + axis[None, :] * stride_pa, mask=row_ok[:, None] & in_head[None, :], other=0.0)
    return pos * inv_freq[None, :]


@triton.jit
def _rope_kernel(X1, Y1, X2, Y2, POS, AXIS, INV_FREQ,
                 stride_x1b, stride_x1h, stride_x1n, stride_x1d, stride_y1b, stride_y1h, stride_y1n, stride_y1d,
                 stride_x2b, stride_x2h, stride_x2n, stride_x2d, stride_y2b, stride_y2h, stride_y2n, stride_y2d,
                 stride_pb, stride_pn, stride_pa, H, N,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSE: tl.constexpr,
                 TWO: tl.constexpr, ALIGN: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    b = (pid // n_tiles).to(tl.int64)
    rows = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    ok = row_ok[:, None] & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    pos_base = POS + b * stride_pb + rows64[:, None] * stride_pn
    theta_e = _angles(POS, AXIS, INV_FREQ, pos_base, row_ok, stride_pa, 0, HEAD_DIM, BLOCK_D // 2)
    theta_o = _angles(POS, AXIS, INV_FREQ, pos_base, row_ok, stride_pa, 1, HEAD_DIM, BLOCK_D // 2)
    cos_e, sin_e = tl.cos(theta_e), tl.sin(theta_e)
    cos_o, sin_o = tl.cos(theta_o), tl.sin(theta_o)
    _turn_heads(X1, Y1, b, rows64, ok, H, stride_x1b, stride_x1h, stride_x1n, stride_x1d, stride_y1b, stride_y1h,
                stride_y1n, stride_y1d, cos_e, sin_e, cos_o, sin_o, BLOCK_D, BLOCK_N, TRANSPOSE, ALIGN)
    if TWO:
        _turn_heads(X2, Y2, b, rows64, ok, H, stride_x2b, stride_x2h, stride_x2n, stride_x2d, stride_y2b,
                    stride_y2h, stride_y2n, stride_y2d, cos_e, sin_e, cos_o, sin_o, BLOCK_D, BLOCK_N, TRANSPOSE,
                    ALIGN)


def _new_like(x):
    B, H, N, D = x.shape
    return x.new_empty((B, N, H, D)).transpose(1, 2)


def rope_apply(x, pos, axis, inv_freq, transpose=False, x2=None):
    """Rotate x [B, H, N, D] (and x2, of the same shape, in the same launch) by pos [B or 1, N, A] (float32) with
    the channel tables axis [D] (int32) and inv_freq [D] (float32). Returns the rotated tensor, or the pair when
    x2 is given, each laid out [B, N, H, D]."""
    B, H, N, D = x.shape
    out = _new_like(x)
    out2 = _new_like(x2) if x2 is not None else None
    if x.numel() > 0:
        block_n = block_rows(D) if not _interpreting() else 16
        stride_pb = pos.stride(0) if pos.shape[0] != 1 else 0
        second = (x2, out2) if x2 is not None else (x, out)  # never read when TWO is False
        grid = (triton.cdiv(N, block_n) * B,)
        _rope_kernel[grid](x, out, *second, pos, axis, inv_freq, *x.stride(), *out.stride(), *second[0].stride(),
                           *second[1].stride(), stride_pb, pos.stride(1), pos.stride(2), H, N, HEAD_DIM=D,
                           BLOCK_D=max(2, triton.next_power_of_2(D)), BLOCK_N=block_n, TRANSPOSE=transpose,
                           TWO=x2 is not None, ALIGN=_row_align(x, out, *second))
    return out if x2 is None else (out, out2)
