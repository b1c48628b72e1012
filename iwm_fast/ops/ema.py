"""EMA update of a target network: ``target <- m * target + (1 - m) * online`` for every parameter pair.

``ema_update_(target, online, momentum)``:
  * target / online: ``nn.Module``s (their ``parameters()``, in order, as I-JEPA pairs them), or iterables
    of tensors. FSDP2 ``DTensor`` parameters are updated on their local shards (``to_local()``).
  * momentum: a Python float, or a 0-d floating tensor on the parameters' device. A tensor is read by the
    kernel through its pointer, so a schedule can change it every step with no host sync and no recompile.

Formula (also the op order, which fixes the rounding): ``fl(fl(t * m) + fl(o * (1 - m)))`` in fp32 (fp64 for
fp64 targets in the PyTorch path), rounded once to the target dtype. For fp32 pairs this is bitwise equal to
I-JEPA's ``k.mul_(m).add_((1 - m) * q)``. ``1 - m`` is formed like PyTorch does: in double for a float
momentum, in fp32 on the device for a tensor momentum.

Dispatch (``iwm_fast.ops.dispatch``): ``auto`` on CUDA (or ``triton``, on the CPU under the interpreter) runs
``iwm_fast.kernels.ema``: one launch per
(target dtype, online dtype, alignment) group, i.e. one launch for a plain fp32 or bf16 model, whatever its
parameter count. Other CPU runs use ``torch._foreach`` ops with the same formula. The update is registered
as the custom op ``iwm_fast::ema_update_`` (mutating its targets) so ``torch.compile`` traces it.
"""
import numbers
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from ..backends import EMA as BACKENDS
from .dispatch import check_backend, use_triton

_TABLE_CACHE = OrderedDict()  # (device, dtypes, aligned, ((t_ptr, o_ptr, numel), ...)) -> device tables
_TABLE_CACHE_SIZE = 16
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch without distributed
        return None
    return DTensor


def _named_tensors(obj, side):
    if isinstance(obj, torch.nn.Module):
        return list(obj.named_parameters())
    if torch.is_tensor(obj):
        return [(f"{side}", obj)]
    try:
        items = list(obj)
    except TypeError:
        raise TypeError(f"ema_update_: {side} must be an nn.Module or an iterable of tensors, "
                        f"got {type(obj).__name__}") from None
    for i, t in enumerate(items):
        if not torch.is_tensor(t):
            raise TypeError(f"ema_update_: {side}[{i}] is a {type(t).__name__}, not a tensor")
    return [(f"{side}[{i}]", t) for i, t in enumerate(items)]


def _local(t, dtensor):
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local().detach()
    return t.detach()


def _pairs(target, online):
    """Validated [(target_local, online_local)] with storage shared with the given parameters."""
    tn, on = _named_tensors(target, "target"), _named_tensors(online, "online")
    if len(tn) != len(on):
        raise ValueError(f"ema_update_: target has {len(tn)} parameters but online has {len(on)}")
    dtensor = _dtensor_type()
    pairs = []
    for (tname, t), (oname, o) in zip(tn, on):
        if t.shape != o.shape:
            raise ValueError(f"ema_update_: shape mismatch: {tname} is {tuple(t.shape)} but "
                             f"{oname} is {tuple(o.shape)}")
        tl_, ol_ = _local(t, dtensor), _local(o, dtensor)
        if tl_.shape != ol_.shape:
            raise ValueError(f"ema_update_: {tname} and {oname} are sharded differently: local shards "
                             f"{tuple(tl_.shape)} and {tuple(ol_.shape)}")
        if tl_.dtype not in _FLOATS or ol_.dtype not in _FLOATS:
            raise TypeError(f"ema_update_: {tname} / {oname} must be floating point, got "
                            f"{tl_.dtype} and {ol_.dtype}")
        if tl_.device != ol_.device:
            raise ValueError(f"ema_update_: {tname} is on {tl_.device} but {oname} is on {ol_.device}")
        pairs.append((tl_, ol_))
    return pairs


def _momentum(momentum, device):
    """(tensor or None, float or None): a 0-d fp32 device tensor, or a Python float."""
    if torch.is_tensor(momentum):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(f"ema_update_: a momentum tensor must hold one floating-point value, got "
                             f"shape {tuple(momentum.shape)} dtype {momentum.dtype}")
        if device is not None and momentum.device != device:
            raise ValueError(f"ema_update_: momentum is on {momentum.device} but the parameters are on {device}")
        # A tensor goes to the kernel unread, its range the caller's to keep: reading it would sync every step.
        return momentum.detach().reshape(()).to(torch.float32), None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"ema_update_: momentum must be a float or a 0-d tensor, got {type(momentum).__name__}")
    _check_range(float(momentum))
    return None, float(momentum)


def _check_range(m):
    if not 0.0 <= m <= 1.0:  # NaN fails too
        raise ValueError(f"ema_update_: momentum must be in [0, 1], got {m}")


def _tables(kernels, group, device, key_head):
    key = key_head + (tuple((t.data_ptr(), o.data_ptr(), t.numel()) for t, o in group),)
    tables = _TABLE_CACHE.get(key)
    if tables is None:
        tables = kernels.build_tables(group, device)
        _TABLE_CACHE[key] = tables
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return tables


def _torch_update(pairs, m_tensor, m_value):
    """Same formula with PyTorch ops: _foreach for same-dtype fp32/fp64 pairs, per tensor otherwise."""
    if not pairs:
        return
    m = m_tensor if m_tensor is not None else m_value
    omm = 1 - m_tensor if m_tensor is not None else 1.0 - m_value
    exact = [(t, o) for t, o in pairs if t.dtype == o.dtype and t.dtype in (torch.float32, torch.float64)]
    rest = [(t, o) for t, o in pairs if not (t.dtype == o.dtype and t.dtype in (torch.float32, torch.float64))]
    if exact:
        ts, os_ = [t for t, _ in exact], [o for _, o in exact]
        torch._foreach_mul_(ts, m)
        torch._foreach_add_(ts, torch._foreach_mul(os_, omm))
    for t, o in rest:
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        t.copy_(t.to(acc) * m + o.to(acc) * omm)


def _update(targets, onlines, momentum, momentum_value, triton):
    pairs = [(t, o) for t, o in zip(targets, onlines) if t.numel() > 0]
    if not pairs:
        return
    device = pairs[0][0].device
    if any(t.device != device for t, _ in pairs):
        raise ValueError("ema_update_: all parameters must be on one device")
    if not triton:
        _torch_update(pairs, momentum, momentum_value)
        return
    from ..kernels import ema as ke  # imports triton; lazy so the CPU PyTorch path never needs it

    groups, slow = {}, []
    for t, o in pairs:
        dense = t.is_contiguous() and o.is_contiguous()
        if not dense or t.dtype not in ke.KERNEL_DTYPES or o.dtype not in ke.KERNEL_DTYPES:
            slow.append((t, o))  # rare: non-contiguous or fp64 parameters
            continue
        aligned = t.data_ptr() % 16 == 0 and o.data_ptr() % 16 == 0
        groups.setdefault((t.dtype, o.dtype, aligned), []).append((t, o))
    for (td, od, aligned), group in groups.items():
        tables = _tables(ke, group, device, (str(device), td, od, aligned))
        ke.ema_launch(tables, td, od, aligned, momentum, momentum_value)
    _torch_update(slow, momentum, momentum_value)


@torch.library.custom_op("iwm_fast::ema_update_", mutates_args=("targets",))
def _ema_op(targets: list[Tensor], onlines: list[Tensor], momentum: Optional[Tensor],
            momentum_value: float, triton: bool) -> None:
    _update(targets, onlines, momentum, None if momentum is not None else momentum_value, triton)


@_ema_op.register_fake
def _(targets, onlines, momentum, momentum_value, triton):
    return None


def _reference_update(pairs, m_tensor, m_value, backend):
    # What users write without our op: one multi-tensor lerp ("foreach"), or I-JEPA's per-parameter loop ("loop").
    m = m_tensor if m_tensor is not None else m_value
    if backend == "foreach":
        torch._foreach_lerp_([t for t, _ in pairs], [o for _, o in pairs], 1.0 - m)
        return
    for t, o in pairs:
        t.mul_(m).add_((1 - m) * o)


def ema_update_(target, online, momentum, *, backend="auto"):
    """target <- m * target + (1 - m) * online, for modules or parameter lists (FSDP2 DTensors: local shards).

    ``backend``: ``auto`` (the fused kernel on CUDA, ``_foreach`` ops with the same formula elsewhere),
    ``triton``, or the unfused references ``foreach`` (``torch._foreach_lerp_``) and ``loop`` (I-JEPA's)."""
    check_backend("ema_update_", backend, BACKENDS)
    pairs = _pairs(target, online)
    if not pairs:
        return
    m_tensor, m_value = _momentum(momentum, pairs[0][0].device)
    with torch.no_grad():
        if backend in ("foreach", "loop"):
            _reference_update(pairs, m_tensor, m_value, backend)
            return
        triton = use_triton("ema_update_", backend, pairs[0][0].device)
        targets, onlines = [t for t, _ in pairs], [o for _, o in pairs]
        if torch.compiler.is_compiling():
            _ema_op(targets, onlines, m_tensor, 0.0 if m_value is None else m_value, triton)
        else:  # eager: skip the dispatcher's boxing of hundreds of tensors
            _update(targets, onlines, m_tensor, m_value, triton)
