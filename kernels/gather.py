"""Triton kernels for the masked-token gather: ``out[r, k] = x[r % B, idx[r, k]] (+ pos[.., idx[r, k]])``.

Rows ``r`` of ``idx`` map onto batch ``r % B`` of ``x``: ``R = B`` is a plain gather, ``R = M * B`` gathers
``M`` stacked masks in one launch, block-major as I-JEPA's ``apply_masks``.

The backward is a deterministic scatter-add. Instead of atomics (whose order, and hence fp rounding,
changes run to run) the host sorts the destination keys once with a stable sort; each program then owns
a set of destination rows and sums their sources in a fixed order (ascending flat position ``r * K + k``,
the order ``index_add`` uses), writing every destination row, zeros included, so no zero-fill pass is
needed. The sort is over the R*K indices only (tens of thousands), negligible next to the [B, N, D] data.
"""
import torch
import triton
import triton.language as tl

@triton.jit
def _gather_fwd_kernel(x_ptr, idx_ptr, pos_ptr, out_ptr,
                       K, B, N, D,
                       sxb, sxn, sxd, sir, sik, spb, spn, spd,
                       HAS_POS: tl.constexpr, CHECK: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_rk = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_kblocks = tl.cdiv(K, BLOCK_K)
    r = (pid_rk // n_kblocks).to(tl.int64)
    b = r % B
    ks = (pid_rk % n_kblocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    n = tl.load(idx_ptr + r * sir + ks * sik, mask=kmask, other=0).to(tl.int64)
    if CHECK:
        tl.device_assert(((n >= 0) & (n < N)) | (~kmask), "masked_gather: index out of range [0, N)")
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    m2 = kmask[:, None] & dmask[None, :]
    out_ty = out_ptr.dtype.element_ty
    v = tl.load(x_ptr + b * sxb + n[:, None] * sxn + ds[None, :] * sxd, mask=m2).to(out_ty)
    if HAS_POS:
        p = tl.load(pos_ptr + b * spb + n[:, None] * spn + ds[None, :] * spd, mask=m2).to(out_ty)
        v = v + p
    rows = r * K + ks
    tl.store(out_ptr + rows[:, None] * D + ds[None, :], v, mask=m2)


@triton.jit
def _scatter_add_rows_kernel(src_ptr, perm_ptr, offsets_ptr, dst_ptr, n_dst, D,
                             ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # dst[i] = sum_{j in [offsets[i], offsets[i+1])} src[perm[j]], summed in ascending j in ACC precision.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_dst
    start = tl.load(offsets_ptr + rows, mask=rmask, other=0)
    count = tl.load(offsets_ptr + rows + 1, mask=rmask, other=0) - start
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    # A while loop, not range(): the Triton interpreter cannot take a reduction result as a range bound.
    max_count = tl.max(count, axis=0)
    j = 0
    while j < max_count:
        valid = j < count
        src = tl.load(perm_ptr + start + j, mask=valid, other=0).to(tl.int64)
        acc += tl.load(src_ptr + src[:, None] * D + ds[None, :], mask=valid[:, None] & dmask[None, :],
                       other=0.0).to(ACC)
        j += 1
    out = acc.to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :], out, mask=rmask[:, None] & dmask[None, :])


def _block_d(D):
    # Largest power-of-two tile that divides D (no masked-off lanes for 768, 1280, ...), else pad.
    for bd in (1024, 512, 256, 128):
        if D % bd == 0:
            return bd
    return min(1024, max(16, triton.next_power_of_2(D)))


def gather_forward(x, idx, pos=None, out_dtype=None, check=False):
    """Launch the gather. x [B, N, D] (any strides), idx [R, K] with R % B == 0, pos [B|1, N, D] or None.

    ``check`` compiles in a device-side assert on the indices (fires only in a Triton debug build,
    which ``check=True`` requests). Inputs are validated by the caller (``iwm_fast.ops.gather``).
    """
    B, N, D = x.shape
    R, K = idx.shape
    out_dtype = out_dtype or x.dtype
    out = torch.empty((R, K, D), dtype=out_dtype, device=x.device)
    if R == 0 or K == 0 or D == 0:
        return out
    has_pos = pos is not None
    if has_pos:
        spb = 0 if pos.shape[0] == 1 else pos.stride(0)
        spn, spd = pos.stride(1), pos.stride(2)
    else:
        pos, spb, spn, spd = x, 0, 0, 0  # never read: HAS_POS=False
    block_d = _block_d(D)
    block_k = max(1, min(triton.next_power_of_2(K), 4096 // block_d))
    grid = (R * triton.cdiv(K, block_k), triton.cdiv(D, block_d))
    extra = {"debug": True} if check else {}
    _gather_fwd_kernel[grid](
        x, idx, pos, out, K, B, N, D,
        x.stride(0), x.stride(1), x.stride(2), idx.stride(0), idx.stride(1), spb, spn, spd,
        HAS_POS=has_pos, CHECK=check, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=4 if block_k * block_d <= 2048 else 8, **extra)
    return out


def destination_map(idx, B, N, batched):
    """(perm, offsets) of the deterministic scatter: row i of the destination sums src rows perm[o_i:o_i+1].

    ``batched``: destinations are (r % B, idx) rows of a [B, N] grid; else idx rows of an [N] grid.
    torch.sort(stable=True) and searchsorted are deterministic on CUDA and CPU.
    """
    R, K = idx.shape
    key = idx.to(torch.int64)
    n_dst = N
    if batched:
        key = key + (torch.arange(R, device=idx.device, dtype=torch.int64) % B)[:, None] * N
        n_dst = B * N
    sorted_key, perm = torch.sort(key.reshape(-1), stable=True)
    bounds = torch.arange(n_dst + 1, device=idx.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_key, bounds)
    return perm, offsets, n_dst


def scatter_add_rows(grad, idx, B, N, batched, out_dtype):
    """Gradient of the gather: [B, N, D] (batched) or [N, D] sums of grad [R, K, D] rows at their indices."""
    R, K, D = grad.shape
    perm, offsets, n_dst = destination_map(idx, B, N, batched)
    shape = (B, N, D) if batched else (N, D)
    if grad.numel() == 0 or n_dst == 0:
        return torch.zeros(shape, dtype=out_dtype, device=grad.device)
    dst = torch.empty((n_dst, D), dtype=out_dtype, device=grad.device)
    grad = grad.contiguous()
    block_d = _block_d(D)
    block_r = max(1, min(16, 4096 // block_d))
    grid = (triton.cdiv(n_dst, block_r), triton.cdiv(D, block_d))
    acc = tl.float64 if out_dtype == torch.float64 else tl.float32
    _scatter_add_rows_kernel[grid](grad, perm, offsets, dst, n_dst, D, ACC=acc, BLOCK_R=block_r,
                                   BLOCK_D=block_d, num_warps=4 if block_r * block_d <= 2048 else 8)
    return dst.view(shape)
