"""Masked-token gather with a fused positional add, and I-JEPA's ``apply_masks`` on top of it.

``masked_gather(x, idx, pos=None)``: ``out[b, k] = x[b, idx[b, k]] (+ pos[idx[b, k]])``, x ``[B, N, D]`` with
any strides (an ``expand``-ed mask token works without a copy), idx ``[B, K]`` int64/int32, pos ``[N, D]``,
``[1, N, D]`` or ``[B, N, D]``; output ``[B, K, D]`` contiguous, dtype ``torch.result_type(x, pos)``.

``apply_masks(x, masks, pos=None)``: masks is one ``[B, K]`` tensor, a list of them (equal K), or a stacked
``[M, B, K]`` tensor; the M gathers are concatenated along the batch (block-major: row ``m * B + b``), all
in one kernel launch.

Backward is deterministic (sorted segmented sum, see ``iwm_fast.kernels.gather``), duplicates allowed; an
expanded x gets a ``[B, N, D]`` gradient that autograd reduces to the expanded-from shape.

Bad indices. ``IWM_FAST_INDEX_CHECK`` (or ``set_index_check``) picks how indices are validated:
  * ``"host"`` (default): min/max are read back and an out-of-range index raises ``IndexError`` naming it.
    Costs one device sync per call. Skipped (falls back to ``"device"``) while a CUDA graph is captured.
  * ``"device"``: no sync; the kernel is built in Triton debug mode with a device-side assert, which
    aborts the CUDA context with "masked_gather: index out of range [0, N)". CPU tensors get the host check
    (it is free there).
  * ``"off"``: no check; an out-of-range index reads out of bounds.

Dispatch (``iwm_fast.ops.dispatch``): ``backend="auto"`` runs the Triton kernels on CUDA and a plain PyTorch
path (deterministic ``index_add_``) elsewhere; ``"triton"`` forces the kernels (on the CPU under the
interpreter); ``"torch"`` and ``"ijepa"`` are the unfused references (``iwm_fast.backends``). Both ops are
``torch.library.custom_op``s with fake implementations and autograd, so ``torch.compile`` traces them.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from ..backends import GATHER as BACKENDS
from .dispatch import check_backend, use_triton

_CHECK_MODES = ("host", "device", "off")
_index_check = os.environ.get("IWM_FAST_INDEX_CHECK", "host")
if _index_check not in _CHECK_MODES:
    raise ValueError(f"IWM_FAST_INDEX_CHECK must be one of {_CHECK_MODES}, got {_index_check!r}")

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def set_index_check(mode):
    """Select index validation: "host" (sync, clear IndexError), "device" (debug-build assert), "off"."""
    global _index_check
    if mode not in _CHECK_MODES:
        raise ValueError(f"index check mode must be one of {_CHECK_MODES}, got {mode!r}")
    _index_check = mode


def get_index_check():
    return _index_check


def _kernels():
    from ..kernels import gather as kg  # imports triton; kept lazy so the CPU PyTorch path never needs it

    return kg


def _host_check(idx, N):
    if idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= N:
        bad = lo if lo < 0 else hi
        raise IndexError(f"masked_gather: index {bad} is out of range for {N} tokens (valid 0..{N - 1})")


def _check_mode(idx):
    mode = _index_check
    if mode == "host" and idx.is_cuda and torch.cuda.is_current_stream_capturing():
        mode = "device"  # a sync is illegal while capturing a CUDA graph
    if mode == "device" and not idx.is_cuda:
        mode = "host"
    return mode


def _batch_rows(R, B, device):
    return (torch.arange(R, device=device) % B)[:, None]


# ---- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("iwm_fast::masked_gather", mutates_args=())
def _gather_op(x: Tensor, idx: Tensor, pos: Optional[Tensor], triton: bool) -> Tensor:
    B, N, D = x.shape
    mode = _check_mode(idx)
    if mode == "host":
        _host_check(idx, N)
    out_dtype = x.dtype if pos is None else torch.result_type(x, pos)
    if triton:
        return _kernels().gather_forward(x, idx, pos, out_dtype=out_dtype, check=mode == "device")
    R = idx.shape[0]
    rows = _batch_rows(R, B, x.device)
    n = idx.long()
    out = x[rows, n].to(out_dtype)
    if pos is not None:
        out = out + pos[rows if pos.shape[0] != 1 else 0, n].to(out_dtype)
    return out.contiguous()


@_gather_op.register_fake
def _(x, idx, pos, triton):
    out_dtype = x.dtype if pos is None else torch.result_type(x, pos)
    return x.new_empty((idx.shape[0], idx.shape[1], x.shape[2]), dtype=out_dtype)


@torch.library.custom_op("iwm_fast::masked_gather_scatter", mutates_args=())
def _scatter_op(grad: Tensor, idx: Tensor, B: int, N: int, batched: bool, dtype: torch.dtype,
                triton: bool) -> Tensor:
    """Sum of grad [R, K, D] rows into [B, N, D] (batched: rows r go to batch r % B) or [N, D]."""
    if triton and dtype in _KERNEL_DTYPES:
        return _kernels().scatter_add_rows(grad, idx, B, N, batched, dtype)
    R, K, D = grad.shape
    key = idx.long()
    if batched:
        key = key + _batch_rows(R, B, idx.device) * N
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n_dst = B * N if batched else N
    dst = torch.zeros((n_dst, D), dtype=acc, device=grad.device)
    dst.index_add_(0, key.reshape(-1), grad.reshape(R * K, D).to(acc))  # deterministic on the CPU
    return dst.to(dtype).view((B, N, D) if batched else (N, D))


@_scatter_op.register_fake
def _(grad, idx, B, N, batched, dtype, triton):
    D = grad.shape[2]
    return grad.new_empty((B, N, D) if batched else (N, D), dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, idx, pos, triton = inputs
    ctx.save_for_backward(idx)
    ctx.triton = triton
    ctx.B, ctx.N = x.shape[0], x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.pos_batched = pos is not None and pos.shape[0] != 1
    ctx.pos_dtype = pos.dtype if pos is not None else None


def _backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    need_x, _, need_pos, _ = ctx.needs_input_grad
    gx = gpos = None
    if need_x:
        gx = _scatter_op(grad, idx, ctx.B, ctx.N, True, ctx.x_dtype, ctx.triton)
    if need_pos:
        if ctx.pos_batched and gx is not None and ctx.pos_dtype == ctx.x_dtype:
            gpos = gx.clone()  # identical sums; two outputs must not alias
        else:
            gpos = _scatter_op(grad, idx, ctx.B, ctx.N, ctx.pos_batched, ctx.pos_dtype, ctx.triton)
            if not ctx.pos_batched:
                gpos = gpos[None]
    return gx, None, gpos, None


_gather_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ------------------------------------------------------------------------------------

def _check_inputs(x, idx, pos, name):
    if not torch.is_tensor(x) or x.dim() != 3:
        raise ValueError(f"{name}: x must be a [B, N, D] tensor, got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if not torch.is_tensor(idx) or idx.dim() != 2:
        raise ValueError(f"{name}: indices must be [B, K] tensors, got "
                         f"{tuple(idx.shape) if torch.is_tensor(idx) else type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: indices must be int64 or int32, got {idx.dtype}")
    if idx.device != x.device:
        raise ValueError(f"{name}: indices are on {idx.device} but x is on {x.device}")
    B, N, D = x.shape
    if pos is None:
        return None
    if not torch.is_tensor(pos):
        raise TypeError(f"{name}: pos must be a tensor or None, got {type(pos).__name__}")
    if pos.device != x.device:
        raise ValueError(f"{name}: pos is on {pos.device} but x is on {x.device}")
    if pos.dim() == 2:
        pos = pos[None]
    if pos.dim() != 3 or tuple(pos.shape[1:]) != (N, D) or pos.shape[0] not in (1, B):
        raise ValueError(f"{name}: pos must be [N, D], [1, N, D] or [B, N, D] = [{B}, {N}, {D}], "
                         f"got {tuple(pos.shape)}")
    if not (x.is_floating_point() and pos.is_floating_point()):
        raise TypeError(f"{name}: pos needs floating-point x and pos, got {x.dtype} and {pos.dtype}")
    return pos


def _run(x, idx, pos, backend, name):
    """[R, K, D] rows gathered by backend; idx [R, K] with R a multiple of x's batch (row r reads batch r % B)."""
    if backend in ("torch", "ijepa"):
        return _reference_gather(x, idx, pos, backend)
    triton = use_triton(name, backend, x.device,
                        supported=x.dtype in _KERNEL_DTYPES and (pos is None or pos.dtype in _KERNEL_DTYPES))
    return _gather_op(x, idx, pos, triton)


def _reference_gather(x, idx, pos, backend):
    # What users write without our op: torch.gather on an expanded index ("torch"), or I-JEPA's index repeated
    # over D ("ijepa"); both let autograd's scatter-add make the gradient.
    B, N, D = x.shape
    if pos is not None:  # positions added to all N tokens first, as I-JEPA's encoder and predictor do
        x = x + pos.to(torch.result_type(x, pos))
    R = idx.shape[0]
    src = x.repeat(R // B, 1, 1) if R != B else x
    index = idx.long().unsqueeze(-1)
    index = index.repeat(1, 1, D) if backend == "ijepa" else index.expand(-1, -1, D)
    return torch.gather(src, 1, index)


def masked_gather(x, idx, pos=None, *, backend="auto"):
    """out[b, k] = x[b, idx[b, k]] (+ pos[idx[b, k]]). x: [B, N, D], idx: [B, K] -> [B, K, D].

    ``backend``: ``auto`` (the Triton kernel on CUDA, PyTorch elsewhere), ``triton``, ``torch`` or ``ijepa``
    (the unfused references, see ``iwm_fast.backends``)."""
    check_backend("masked_gather", backend, BACKENDS)
    pos = _check_inputs(x, idx, pos, "masked_gather")
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"masked_gather: indices have batch {idx.shape[0]} but x has batch {x.shape[0]}")
    return _run(x, idx, pos, backend, "masked_gather")


def apply_masks(x, masks, pos=None, *, backend="auto"):
    """I-JEPA's helper: gather each [B, K] mask and concatenate the results along the batch dimension."""
    check_backend("apply_masks", backend, BACKENDS)
    if torch.is_tensor(masks):
        if masks.dim() == 2:
            return masked_gather(x, masks, pos, backend=backend)
        if masks.dim() != 3:
            raise ValueError(f"apply_masks: masks must be [B, K], [M, B, K] or a list of [B, K], "
                             f"got a tensor of shape {tuple(masks.shape)}")
        stacked = masks
    else:
        masks = list(masks)
        if not masks:
            raise ValueError("apply_masks: the list of masks is empty")
        for m in masks:
            if not torch.is_tensor(m) or m.dim() != 2:
                raise ValueError(f"apply_masks: every mask must be a [B, K] tensor, got "
                                 f"{tuple(m.shape) if torch.is_tensor(m) else type(m).__name__}")
        shapes = {tuple(m.shape) for m in masks}
        dtypes = {m.dtype for m in masks}
        if len(shapes) != 1:
            raise ValueError(f"apply_masks: masks must all have the same [B, K] shape (their results are "
                             f"concatenated along the batch), got {sorted(shapes)}")
        if len(dtypes) != 1:
            raise TypeError(f"apply_masks: masks must share one dtype, got {sorted(map(str, dtypes))}")
        if len(masks) == 1:
            return masked_gather(x, masks[0], pos, backend=backend)
        stacked = torch.stack(masks)
    M, B, K = stacked.shape
    if B != x.shape[0]:
        raise ValueError(f"apply_masks: masks have batch {B} but x has batch {x.shape[0]}")
    idx = stacked.reshape(M * B, K)
    pos = _check_inputs(x, idx, pos, "apply_masks")
    return _run(x, idx, pos, backend, "apply_masks")
