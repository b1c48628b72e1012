"""Walk a model, replace each recognised attention module in place, and undo it."""
import torch.nn as nn

from ..backends import ATTENTION as _BACKENDS
from .attention import (PatchedAttention, Unsupported, WrapsOriginal, _is_attention_like, _type_name,
                        inspect_attention, probe)
from .report import ModuleDecision, PatchReport
from .rope import inspect_rope, is_vjepa2_rope, make_patched_rope, probe_rope


def _parents(model):
    # A module can sit under several parents (shared blocks): every slot that holds it must be swapped.
    parents = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for name, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((module, name))
    return parents


def _rope_replacement(module, backend):
    spec = inspect_rope(module)
    patched = make_patched_rope(module, spec, backend)
    probe_rope(module, patched)
    return patched, (f"heads={spec.num_heads}, head_dim={spec.head_dim}, rotary axes {spec.axes} (V-JEPA 2 "
                     f"layout), grid_size={spec.grid_size}")


def _attention_replacement(module, backend):
    spec = inspect_attention(module)
    patched = PatchedAttention(module, spec, backend)
    probe(module, patched, spec)
    return patched, (f"heads={spec.num_heads}, head_dim={spec.head_dim}, scale={spec.scale:.6g}"
                     + (" (assumed head_dim**-0.5)" if spec.scale_assumed else "")
                     + (", returns (x, None)" if patched.returns_attn_tuple else ""))


def _replace(module, path, replacement, *, root, parents, report):
    """Put ``replacement``'s module in every slot that holds ``module`` and report it; where it is unsupported,
    report why and return False (its children are then visited)."""
    try:
        if module is root:
            raise Unsupported("the root module cannot be replaced in place; patch its parent")
        patched, detail = replacement()
    except Unsupported as e:
        report.left_alone.append(ModuleDecision(path, _type_name(module), str(e)))
        return False
    for parent, name in parents[id(module)]:
        parent._modules[name] = patched
    report.replaced.append(ModuleDecision(path, _type_name(module), detail))
    return True


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
    parents = _parents(model)
    seen = set()

    def visit(module, path):
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, WrapsOriginal):
            report.left_alone.append(ModuleDecision(path, _type_name(module.original), "already patched"))
            return
        build = (_rope_replacement if is_vjepa2_rope(module)
                 else _attention_replacement if _is_attention_like(module) else None)
        if build is not None and _replace(module, path, lambda: build(module, backend), root=model, parents=parents,
                                          report=report):
            return
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return report


def unpatch_model(model):
    """Put back every original module that ``patch_model`` replaced; return the paths restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_model expects an nn.Module, got {type(model).__name__}")
    restored = []
    for path, module in list(model.named_modules(remove_duplicate=False)):
        for name, child in list(module._modules.items()):
            if isinstance(child, WrapsOriginal):
                original = child.original
                for sub, sub_module in child._modules.items():  # keep any submodule swapped in while patched
                    original._modules[sub] = sub_module
                original.training = child.training
                module._modules[name] = original
                restored.append(f"{path}.{name}" if path else name)
    return restored
