"""Walk a model, replace each recognised attention module in place, and undo it.

Each kind of module the walker knows has a recogniser: ``matches(module)`` and ``build(module, backend, root)``,
which returns the stand-in (already checked against the original on a probe) and the report's detail, or raises
``Unsupported`` with the reason. Library recognisers (transformers, timm) are consulted only when that library is
imported. After the walk, a transformers model's interface-dispatching attention layers are switched to the
``"iwm_fast"`` attention implementation (``iwm_fast.integrations.hf``).
"""
import sys
from dataclasses import dataclass, field

import torch.nn as nn

from ..backends import ATTENTION as _BACKENDS
from .attention import (PatchedAttention, Unsupported, WrapsOriginal, _is_attention_like, _type_name,
                        inspect_attention, probe)
from .report import ModuleDecision, PatchReport
from .rope import inspect_rope, is_vjepa2_rope, make_patched_rope, probe_rope


@dataclass(frozen=True)
class Recogniser:
    matches: object  # module -> bool
    build: object    # (module, backend, root) -> (stand-in, detail), raises Unsupported; None: not replaced here


def _build_vjepa2_rope(module, backend, root):
    spec = inspect_rope(module)
    patched = make_patched_rope(module, spec, backend)
    probe_rope(module, patched)
    return patched, (f"heads={spec.num_heads}, head_dim={spec.head_dim}, rotary axes {spec.axes} (V-JEPA 2 "
                     f"layout), grid_size={spec.grid_size}")


def _build_generic(module, backend, root):
    spec = inspect_attention(module)
    patched = PatchedAttention(module, spec, backend)
    probe(module, patched, spec)
    return patched, (f"heads={spec.num_heads}, head_dim={spec.head_dim}, scale={spec.scale:.6g}"
                     + (" (assumed head_dim**-0.5)" if spec.scale_assumed else "")
                     + (", returns (x, None)" if patched.returns_attn_tuple else ""))


def _recognisers():
    """Most specific first: library modules by class, V-JEPA 2's rotary modules, then any qkv/proj attention."""
    found = []
    if "transformers" in sys.modules:
        from ..integrations import hf, hf_rope
        found.append(Recogniser(hf_rope.matches, hf_rope.build))
        # transformers' other layers use the attention-function switch after the walk, not a stand-in.
        found.append(Recogniser(hf.is_transformers_module, None))
    if "timm" in sys.modules:
        from ..integrations import timm
        found.append(Recogniser(timm.matches, timm.build))
    return found + [Recogniser(is_vjepa2_rope, _build_vjepa2_rope), Recogniser(_is_attention_like, _build_generic)]


@dataclass
class _Walk:
    root: nn.Module
    backend: str
    report: PatchReport
    recognisers: list
    parents: dict = field(default_factory=dict)
    seen: set = field(default_factory=set)
    standins: set = field(default_factory=set)


def _parents(model):
    # A module can sit under several parents (shared blocks): every slot that holds it must be swapped.
    parents = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for name, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((module, name))
    return parents


def _try_replace(module, path, recogniser, walk):
    """Replace ``module`` in every slot that holds it; False (and the reason reported) if it cannot be."""
    try:
        if module is walk.root:
            raise Unsupported("the root module cannot be replaced in place; patch its parent")
        patched, detail = recogniser.build(module, walk.backend, walk.root)
    except Unsupported as e:
        walk.report.left_alone.append(ModuleDecision(path, _type_name(module), str(e)))
        return False
    for parent, name in walk.parents[id(module)]:
        parent._modules[name] = patched
    walk.report.replaced.append(ModuleDecision(path, _type_name(module), detail))
    walk.standins.add(path)
    return True


def _visit(module, path, walk):
    if id(module) in walk.seen:
        return
    walk.seen.add(id(module))
    if isinstance(module, WrapsOriginal):
        walk.report.left_alone.append(ModuleDecision(path, _type_name(module.original), "already patched"))
        walk.standins.add(path)
        return
    recogniser = next((r for r in walk.recognisers if r.matches(module)), None)
    if recogniser is not None and recogniser.build is not None and _try_replace(module, path, recogniser, walk):
        return
    for name, child in module._modules.items():
        if child is not None:
            _visit(child, f"{path}.{name}" if path else name, walk)


def patch_model(model, *, attention=True, backend="auto"):
    """Swap fused attention into ``model`` in place and return a PatchReport of what was replaced or left alone.

    Parameters stay the same objects, state-dict keys are unchanged, and each replacement is checked against the
    original on a probe input before it is kept. ``unpatch_model`` puts the original modules back.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model expects an nn.Module, got {type(model).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    report = PatchReport(backend=backend)
    if not attention:
        return report
    walk = _Walk(model, backend, report, _recognisers(), _parents(model))
    _visit(model, "", walk)
    if "transformers" in sys.modules:
        from ..integrations import hf
        hf.switch_attention(model, backend, report, walk.standins)
    return report


def _restore(slot_owner, name, standin):
    original = standin.original
    for sub, sub_module in standin._modules.items():  # keep any submodule swapped in while patched
        original._modules[sub] = sub_module
    for own in ("_parameters", "_buffers"):  # and parameters/buffers the stand-in held for it (moved by .to())
        for key, value in getattr(standin, own).items():
            if key in getattr(original, own):
                getattr(original, own)[key] = value
    original.training = standin.training
    slot_owner._modules[name] = original


def unpatch_model(model):
    """Put back every original module that ``patch_model`` replaced, and a transformers model's previous
    attention implementation; return the paths restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_model expects an nn.Module, got {type(model).__name__}")
    restored = []
    for path, module in list(model.named_modules(remove_duplicate=False)):
        for name, child in list(module._modules.items()):
            if isinstance(child, WrapsOriginal):
                _restore(module, name, child)
                restored.append(f"{path}.{name}" if path else name)
    if "_iwm_hf_previous" in model.__dict__:
        from ..integrations import hf
        hf.restore_attention(model)
    return restored
