"""Hugging Face transformers: iwm-fast's attention as the attention implementation ``"iwm_fast"``.

Importing this module registers it (``AttentionInterface`` and, for the models that build masks,
``AttentionMaskInterface`` with transformers' SDPA mask), so that both of these work::

    import iwm_fast.integrations.hf
    model = IJepaModel.from_pretrained(path, attn_implementation="iwm_fast")
    model.set_attn_implementation("iwm_fast")

Every attention layer of IJepa, ViT, DINOv2 and V-JEPA 2 (encoder, predictor, the video classifier's pooler)
calls the function registered under ``config._attn_implementation``; ``iwm_fast_attention`` runs
``iwm_fast.ops.attention`` (the Triton kernel on CUDA, SDPA on the CPU). What the kernel does not compute is
handed to transformers' own path, with the reason logged once per reason: an attention mask, attention dropout
in training, a head mask, soft-capping or sliding windows, grouped key/value heads, causal attention between
different query and key lengths (SDPA), and ``output_attentions=True`` (the model's eager path, since the fused
kernel never materialises the weights). ``iwm_fast.patch.patch_model`` switches a loaded model to it, puts the
fused rotary pass into V-JEPA 2's rope attention (``integrations.hf_rope``), and ``unpatch_model`` restores the
previous implementation.
"""
import functools
import inspect
import sys

from ..ops.attention import attention
from ..patch.report import ModuleDecision, say_once

NAME = "iwm_fast"
_UNSUPPORTED_KWARGS = ("head_mask", "softcap", "sliding_window", "s_aux", "position_bias")


def loaded():
    """Whether transformers is imported (a model from it can only exist then)."""
    return "transformers" in sys.modules


def register():
    """Register ``"iwm_fast"`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, iwm_fast_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _unsupported(module, query, key, attention_mask, dropout, causal, kwargs):
    """(reason, use_eager) for a call the fused kernel does not compute, else (None, False)."""
    if kwargs.get("output_attentions"):
        return "output_attentions=True (the fused kernel never materialises the weights)", True
    if attention_mask is not None:
        return "an attention mask was given (padding or custom mask)", False
    if dropout:
        return f"attention dropout p={dropout} in training", False
    given = [name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if given:
        return f"{given[0]} was given", False
    if query.shape[1] != key.shape[1]:
        return f"grouped key/value heads ({query.shape[1]} query heads, {key.shape[1]} key heads)", False
    if causal and query.shape[2] != key.shape[2]:
        return "causal attention between different query and key lengths", False
    return None, False


def _fallback(reason, eager, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None) if eager else None
    say_once(f"iwm_fast attention: {reason}; such calls run transformers' {'eager' if fn else 'SDPA'} attention")
    if fn is not None:
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def iwm_fast_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers' attention-function contract: q, k, v [B, H, N, D] in, ([B, N, H, D], weights or None) out."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    causal = causal and query.shape[2] > 1 and attention_mask is None
    reason, eager = _unsupported(module, query, key, attention_mask, dropout, causal, kwargs)
    if reason is not None:
        return _fallback(reason, eager, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                         kwargs)
    out = attention(query, key, value, scale=scaling, block_causal=1 if causal else None,
                    backend=getattr(module, "_iwm_backend", "auto"))
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _calls_interface(cls):
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in source


def is_transformers_module(module):
    return type(module).__module__.startswith("transformers.")


def is_interface_attention(module):
    """A transformers module whose forward dispatches through ``config._attn_implementation``."""
    cls = type(module)
    return cls.__module__.startswith("transformers.") and _calls_interface(cls) and \
        hasattr(getattr(module, "config", None), "_attn_implementation_internal")


def _type_name(module):
    return f"{type(module).__module__}.{type(module).__qualname__}"


def switch_attention(model, backend, report, standins):
    """Point every interface-dispatching attention layer of ``model`` at ``"iwm_fast"``; ``standins`` maps the
    paths replaced by a stand-in (their originals still dispatch through the interface when they fall back)."""
    register()
    configs, previous = {}, model.__dict__.setdefault("_iwm_hf_previous", [])
    for path, module in model.named_modules():
        inner = getattr(module, "original", module) if path in standins else module
        if not is_interface_attention(inner):
            continue
        config = inner.config
        inner._iwm_backend = backend
        configs.setdefault(id(config), config)
        was = config._attn_implementation_internal
        if path in standins:
            continue
        if was == NAME:
            report.left_alone.append(ModuleDecision(path, _type_name(inner), f"already using {NAME!r}"))
        else:
            report.replaced.append(ModuleDecision(path, _type_name(inner), f"transformers attention implementation "
                                                  f"{NAME!r} (was {was!r})"))
    for config in configs.values():
        if config._attn_implementation_internal != NAME:
            previous.append((config, config._attn_implementation_internal))
            config._attn_implementation_internal = NAME


def restore_attention(model):
    """Undo ``switch_attention``: the previous implementation on every config it changed."""
    for config, was in reversed(model.__dict__.pop("_iwm_hf_previous", [])):
        config._attn_implementation_internal = was
    for module in model.modules():
        module.__dict__.pop("_iwm_backend", None)


try:
    register()
except ImportError:  # transformers is not installed: nothing to register with
    pass
