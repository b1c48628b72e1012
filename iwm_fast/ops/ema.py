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

Host time: the checks, the grouping and the kernel's address tables are built once per (target, online) pair
and reused while the parameters stay in place (``iwm_fast.ops.ema_plan`` says what it checks on each call), so
an eager call costs a pass over the parameters' addresses and the launches.
"""
import numbers
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from ..backends import EMA as BACKENDS
from .dispatch import check_backend, use_triton
from .ema_plan import _dtensor_type, cached_plan

_WORK_CACHE = OrderedDict()  # (triton, ((t_ptr, o_ptr, numel, dtypes), ...)) -> the op path's _Work
_WORK_CACHE_SIZE = 4
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


def _torch_update(exact, rest, m_tensor, m_value):
    """Same formula with PyTorch ops: _foreach over the same-dtype fp32/fp64 pairs ``exact`` (two lists),
    per tensor over the pairs ``rest``."""
    m = m_tensor if m_tensor is not None else m_value
    omm = 1 - m_tensor if m_tensor is not None else 1.0 - m_value
    if exact[0]:
        torch._foreach_mul_(exact[0], m)
        torch._foreach_add_(exact[0], torch._foreach_mul(exact[1], omm))
    for t, o in rest:
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        t.copy_(t.to(acc) * m + o.to(acc) * omm)


class _Work:
    """One update's fixed work over validated pairs: a kernel launch per (target dtype, online dtype,
    alignment) group with its device address tables, and the pairs the PyTorch path takes (all of them
    without the kernel; else the rare non-contiguous or fp64 ones)."""

    def __init__(self, pairs, triton):
        pairs = [(t, o) for t, o in pairs if t.numel() > 0]
        self.pairs, self.triton, self.launches = pairs, triton, []
        self.device = pairs[0][0].device if pairs else None
        if any(t.device != self.device for t, _ in pairs):
            raise ValueError("ema_update_: all parameters must be on one device")
        rest = pairs
        if triton and pairs:
            from ..kernels import ema as ke  # imports triton; lazy so the CPU PyTorch path never needs it

            self.kernels, groups, rest = ke, {}, []
            for t, o in pairs:
                if not (t.is_contiguous() and o.is_contiguous()) or {t.dtype, o.dtype} - set(ke.KERNEL_DTYPES):
                    rest.append((t, o))
                    continue
                aligned = t.data_ptr() % 16 == 0 and o.data_ptr() % 16 == 0
                groups.setdefault((t.dtype, o.dtype, aligned), []).append((t, o))
            self.launches = [(ke.build_tables(g, self.device), *key) for key, g in groups.items()]
        same = [(t, o) for t, o in rest if t.dtype == o.dtype and t.dtype in (torch.float32, torch.float64)]
        self.exact = ([t for t, _ in same], [o for _, o in same])
        self.rest = [(t, o) for t, o in rest if not (t.dtype == o.dtype and t.dtype in (torch.float32, torch.float64))]

    def run(self, m_tensor, m_value):
        for tables, t_dtype, o_dtype, aligned in self.launches:
            self.kernels.ema_launch(tables, t_dtype, o_dtype, aligned, m_tensor, m_value)
        _torch_update(self.exact, self.rest, m_tensor, m_value)


def _work_for(pairs, triton):
    """The op path's work (torch.compile): cached by the pairs' addresses and sizes."""
    key = (triton, tuple((t.data_ptr(), o.data_ptr(), t.numel(), t.dtype, o.dtype) for t, o in pairs))
    work = _WORK_CACHE.get(key)
    if work is None:
        work = _WORK_CACHE[key] = _Work(pairs, triton)
        if len(_WORK_CACHE) > _WORK_CACHE_SIZE:
            _WORK_CACHE.popitem(last=False)
    else:
        _WORK_CACHE.move_to_end(key)
    return work


@torch.library.custom_op("iwm_fast::ema_update_", mutates_args=("targets",))
def _ema_op(targets: list[Tensor], onlines: list[Tensor], momentum: Optional[Tensor],
            momentum_value: float, triton: bool) -> None:
    work = _work_for(list(zip(targets, onlines)), triton)
    work.run(momentum, None if momentum is not None else momentum_value)


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


def _compiled_update(target, online, momentum, backend):
    # Under torch.compile: the op (traced as one node), its work cached by the parameters' addresses.
    pairs = _pairs(target, online)
    if not pairs:
        return
    m_tensor, m_value = _momentum(momentum, pairs[0][0].device)
    triton = use_triton("ema_update_", backend, pairs[0][0].device)
    _ema_op([t for t, _ in pairs], [o for _, o in pairs], m_tensor, 0.0 if m_value is None else m_value, triton)


def ema_update_(target, online, momentum, *, backend="auto"):
    """target <- m * target + (1 - m) * online, for modules or parameter lists (FSDP2 DTensors: local shards).

    ``backend``: ``auto`` (the fused kernel on CUDA, ``_foreach`` ops with the same formula elsewhere),
    ``triton``, or the unfused references ``foreach`` (``torch._foreach_lerp_``) and ``loop`` (I-JEPA's).
    The validated pairs, their grouping and the kernel's address tables are built once per (target, online)
    and reused while the parameters stay where they are (``iwm_fast.ops.ema_plan``)."""
    check_backend("ema_update_", backend, BACKENDS)
    with torch.no_grad():
        if backend in ("foreach", "loop"):
            pairs = _pairs(target, online)
            if pairs:
                _reference_update(pairs, *_momentum(momentum, pairs[0][0].device), backend)
            return
        if torch.compiler.is_compiling():
            _compiled_update(target, online, momentum, backend)
            return

        def build(t, o):
            pairs = _pairs(t, o)
            return _Work(pairs, bool(pairs) and use_triton("ema_update_", backend, pairs[0][0].device))

        work = cached_plan(target, online, backend, build).work
        if work.device is None:
            return
        m_tensor, m_value = _momentum(momentum, work.device)
        if use_triton("ema_update_", backend, work.device) != work.triton:  # the interpreter switched since
            work = _Work(work.pairs, not work.triton)
        work.run(m_tensor, m_value)
