"""The EMA update's plan: what one ``ema_update_(target, online, m)`` needs, built once per pair of modules.

Building it walks both modules, checks every parameter pair, groups the pairs by (dtypes, alignment) and copies
the kernel's address tables to the device: about 2 ms of host time for ViT-H's 389 pairs, more than the
update's own 2.5 ms of ideal kernel time. A plan is reused while it still describes the modules, which a call
checks in one pass of C-level iterators over the parameters (no Python loop):

- no module anywhere registered a parameter or a submodule since the plan was built (``torch.nn``'s global
  registration hooks bump a counter), so no parameter or layer was added or assigned anew;
- each parameter slot (its owner's ``_parameters`` and its name there) holds storage at the recorded address
  (the local shard's, for FSDP2 ``DTensor`` parameters), so nothing was swapped in underneath: not a
  parameter written into a slot directly, not ``param.data = ...``, not ``module.to(...)``.

The plan holds the parameters it was built from, so none of their storage is freed and reused while it lives:
an equal address is the same storage. It is dropped when either module is garbage collected. Plans for lists of
tensors (not modules) are kept for the last two lists, checked by the tensors' addresses.
"""
import collections
import operator
import weakref

import torch

_GENERATION = [0]
_MODULE_PLANS = {}  # (id(target), id(online), triton) -> plan
_LIST_PLANS = collections.OrderedDict()  # (ids of the tensors, triton) -> plan
_LIST_PLANS_KEPT = 2
_LOCAL = operator.attrgetter("_local_tensor")  # a DTensor's local shard (a slot of DTensor: no Python call)
_DATA_PTR = torch.Tensor.data_ptr


def _registration_seen(*_):
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registration_seen)
torch.nn.modules.module.register_module_module_registration_hook(_registration_seen)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch without distributed
        return None
    return DTensor


def _slots(module, dtensor):
    """([(dicts, names)] of plain parameters, and of DTensor ones): where each parameter of ``module`` lives."""
    seen, plain, sharded = set(), ([], []), ([], [])
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            side = sharded if dtensor is not None and isinstance(p, dtensor) else plain
            side[0].append(owner._parameters)
            side[1].append(name)
    return plain, sharded


def _addresses(plain, sharded):
    """Storage addresses now in the slots: one C-level pass per kind (raises if a slot changed kind)."""
    now = list(map(_DATA_PTR, map(operator.getitem, *plain)))
    return now + list(map(_DATA_PTR, map(_LOCAL, map(operator.getitem, *sharded))))


class Plan:
    """A built update (``work``: what ``iwm_fast.ops.ema`` runs) and how to tell that it still holds."""

    def __init__(self, work, keep, check):
        self.work, self.keep, self.check = work, keep, check
        self.generation = _GENERATION[0]
        self.addresses = self._read()

    def _read(self):
        try:
            return self.check()
        except (RuntimeError, AttributeError, KeyError):  # a slot holds another kind of tensor, or none
            return None

    def holds(self):
        return self.generation == _GENERATION[0] and self.addresses is not None and self._read() == self.addresses


def _module_plan(target, online, triton, build):
    key = (id(target), id(online), triton)
    plan = _MODULE_PLANS.get(key)
    if plan is not None and plan.keep[0]() is target and plan.keep[1]() is online and plan.holds():
        return plan
    dtensor = _dtensor_type()
    (tp, ts), (op, os_) = _slots(target, dtensor), _slots(online, dtensor)
    plain, sharded = (tp[0] + op[0], tp[1] + op[1]), (ts[0] + os_[0], ts[1] + os_[1])
    keep = (weakref.ref(target), weakref.ref(online), list(map(operator.getitem, *plain)),
            list(map(operator.getitem, *sharded)))
    plan = Plan(build(target, online), keep, lambda: _addresses(plain, sharded))
    if key not in _MODULE_PLANS:  # the plan (and the parameters it holds) goes with either module
        for module in (target, online):
            weakref.finalize(module, _MODULE_PLANS.pop, key, None)
    _MODULE_PLANS[key] = plan
    return plan


def _as_list(obj):
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters())
    if torch.is_tensor(obj):
        return [obj]
    try:
        return list(obj)
    except TypeError:
        return None  # not iterable: build() says so


def _list_plan(targets, onlines, triton, build):
    if targets is None or onlines is None:
        return Plan(build(targets, onlines), None, list)
    tensors = targets + onlines
    key = (tuple(map(id, tensors)), len(targets), triton)
    plan = _LIST_PLANS.get(key)
    if plan is not None and plan.holds():
        _LIST_PLANS.move_to_end(key)
        return plan
    plan = Plan(build(targets, onlines), tensors, lambda: list(map(_DATA_PTR, tensors)))
    _LIST_PLANS[key] = plan
    if len(_LIST_PLANS) > _LIST_PLANS_KEPT:
        _LIST_PLANS.popitem(last=False)
    return plan


def cached_plan(target, online, triton, build):
    """The plan of (target, online): reused while it holds, else ``build(target, online)`` anew. Modules are keyed
    by identity; anything else is read as lists of tensors (plain tensors: a list of DTensors is rebuilt on
    every call, modules of them are not)."""
    if isinstance(target, torch.nn.Module) and isinstance(online, torch.nn.Module):
        return _module_plan(target, online, triton, build)
    return _list_plan(_as_list(target), _as_list(online), triton, build)
