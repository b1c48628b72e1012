"""Fused multi-tensor EMA: ``target <- target * m + online * (1 - m)`` over many tensors in one launch.

Layout: a pointer table. Per (target dtype, online dtype, alignment) group the host builds, once and cached
by storage addresses, int64 tables of target/online addresses and sizes, plus a chunk table: program ``p``
updates elements ``[c * CHUNK, (c + 1) * CHUNK)`` of tensor ``tid[p]``, ``c = cidx[p]``. So a step is one
launch per group (one for a plain fp32 or bf16 model, two for mixed), whatever the parameter count, with no
copy into or out of a flat buffer.

Numerics: computed in fp32 as ``fl(fl(t * m) + fl(o * (1 - m)))`` with FMA contraction disabled, the same
roundings as I-JEPA's ``k.mul_(m).add_((1 - m) * q)`` (bitwise equal for fp32), then rounded once to the
target dtype. ``1 - m`` is formed in double on the host for a Python-float momentum (as PyTorch does with a
scalar), in fp32 on the device for a tensor momentum (as ``1 - m_tensor`` does).

Speed: chunks are whole multiples of BLOCK, so every block but a tensor's last runs unmasked; with
16-byte-aligned addresses (the ``ALIGNED`` groups, checked on the host) the compiler is told so and emits
128-bit loads and stores.
"""
import torch
import triton
import triton.language as tl

BLOCK = 2048
CHUNK = 8 * BLOCK

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
KERNEL_DTYPES = tuple(_TL)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    # fp32 -> bf16 by explicit round-to-nearest-even on the bits: the same result as the GPU's cvt.rn, and
    # also right under the Triton interpreter, whose fp32 -> bf16 cast truncates.
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (the carry could turn it into +-0/inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _ema_kernel(t_addr_ptr, o_addr_ptr, numel_ptr, tid_ptr, cidx_ptr, mom_ptr, mom, one_minus_mom,
                T_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, MOM_FROM_PTR: tl.constexpr,
                ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tid = tl.load(tid_ptr + pid)
    start = tl.load(cidx_ptr + pid).to(tl.int64) * CHUNK
    numel = tl.load(numel_ptr + tid)
    t_addr = tl.load(t_addr_ptr + tid)
    o_addr = tl.load(o_addr_ptr + tid)
    t_ptr = t_addr.to(tl.pointer_type(T_DTYPE))
    o_ptr = o_addr.to(tl.pointer_type(O_DTYPE))
    if ALIGNED:
        t_ptr = tl.multiple_of(t_ptr, 16)
        o_ptr = tl.multiple_of(o_ptr, 16)
    if MOM_FROM_PTR:
        m = tl.load(mom_ptr).to(tl.float32)
        omm = 1.0 - m
    else:
        m = mom
        omm = one_minus_mom
    n_here = tl.minimum(numel - start, CHUNK)
    n_full = n_here // BLOCK
    ar = tl.arange(0, BLOCK)
    # A while loop, not range(): the Triton interpreter cannot take a loaded scalar as a range bound.
    i = 0
    while i < n_full:
        offs = tl.multiple_of(start + i * BLOCK, BLOCK) + ar
        t = tl.load(t_ptr + offs).to(tl.float32)
        o = tl.load(o_ptr + offs).to(tl.float32)
        tl.store(t_ptr + offs, _round_to(t * m + o * omm, T_DTYPE))
        i += 1
    if n_full * BLOCK < n_here:
        offs = start + n_full * BLOCK + ar
        mask = offs < start + n_here
        t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + offs, _round_to(t * m + o * omm, T_DTYPE), mask=mask)


def build_tables(pairs, device):
    """Device int64 tables (t_addr, o_addr, numel, tid, cidx) for [(target, online), ...] (non-empty)."""
    numels = torch.tensor([t.numel() for t, _ in pairs], dtype=torch.int64)
    n_chunks = (numels + CHUNK - 1) // CHUNK
    tid = torch.repeat_interleave(torch.arange(len(pairs), dtype=torch.int64), n_chunks)
    first = torch.cumsum(n_chunks, 0) - n_chunks
    cidx = torch.arange(int(n_chunks.sum()), dtype=torch.int64) - torch.repeat_interleave(first, n_chunks)
    addrs = torch.tensor([[t.data_ptr(), o.data_ptr()] for t, o in pairs], dtype=torch.int64)
    flat = torch.cat([addrs[:, 0], addrs[:, 1], numels, tid, cidx]).to(device)  # one host->device copy
    T = len(pairs)
    return flat[:T], flat[T:2 * T], flat[2 * T:3 * T], flat[3 * T:3 * T + tid.numel()], flat[3 * T + tid.numel():]


def ema_launch(tables, t_dtype, o_dtype, aligned, momentum_tensor, momentum):
    """One launch over a group; ``momentum_tensor`` (fp32, 0-d, on device) wins over the float ``momentum``."""
    t_addr, o_addr, numel, tid, cidx = tables
    grid = (tid.numel(),)
    from_ptr = momentum_tensor is not None
    mom_ptr = momentum_tensor if from_ptr else numel  # never read when not from_ptr
    m = 0.0 if from_ptr else float(momentum)
    _ema_kernel[grid](t_addr, o_addr, numel, tid, cidx, mom_ptr, m, 1.0 - m,
                      T_DTYPE=_TL[t_dtype], O_DTYPE=_TL[o_dtype], MOM_FROM_PTR=from_ptr, ALIGNED=aligned,
                      CHUNK=CHUNK, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
