"""Recognise a qkv/proj self-attention module and stand a fused-attention module in for it.

A module is replaced only when every part of it is understood: a fused ``qkv`` Linear of width 3*dim, a ``proj``
Linear, a head count, and only submodules whose role is known (q_norm, k_norm, norm, attn_drop, proj_drop or an
Identity). Anything else (a separate q/v bias, rotary or relative position terms, extra forward arguments, hooks,
attention dropout) leaves the module alone with the reason; V-JEPA 2's rotary modules have their own stand-in
(``patch/rope.py``). A probe then runs the original and the replacement on
the same random input and refuses the replacement if their outputs differ, so a look-alike is never mis-patched.
"""
import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops.attention import attention

# Submodules whose place in a qkv/proj attention forward is known (timm, I-JEPA, V-JEPA and their forks).
_KNOWN_CHILDREN = ("qkv", "proj", "q_norm", "k_norm", "norm", "attn_drop", "proj_drop")
_HEAD_COUNT_NAMES = ("num_heads", "n_heads", "heads")
_ROTARY_NAMES = ("rope", "rotary", "rotary_emb", "rotary_pos_emb", "freqs_cis", "freqs", "pos_freqs")
_REL_POS_NAMES = ("relative_position_bias_table", "relative_position_index", "rel_pos_h", "rel_pos_w",
                  "rel_pos", "pos_bias", "attn_bias", "alibi")
# Float attributes that some implementations hand to SDPA as dropout_p (V-JEPA passes proj_drop_prob).
_DROP_FLOAT_NAMES = ("attn_drop_prob", "proj_drop_prob", "attn_drop", "attn_dropout", "dropout", "dropout_p")
# Relative output error allowed by the probe, per parameter dtype: a few times the dtype's own attention error
# (TF32 matmuls for float32 on GPU), far below the O(0.1-1) error of a wrong scale, layout or position term.
_PROBE_TOL = {torch.float32: 1e-2, torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class Unsupported(Exception):
    """Raised with the reason why a module cannot be replaced."""


@dataclass(frozen=True)
class AttentionSpec:
    dim: int
    num_heads: int
    head_dim: int
    scale: float
    scale_assumed: bool


def _type_name(module):
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_attention_like(module):
    name = type(module).__name__.lower()
    return "qkv" in module._modules or "attention" in name or name.endswith("attn")


def _check_names(module):
    cls = type(module).__name__.lower()
    if "rope" in cls or "rotary" in cls:
        raise Unsupported(f"rotary embedding present (class {type(module).__name__})")
    own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    names = own | set(module._modules) | set(vars(module))
    if {"q_bias", "v_bias"} & own:
        raise Unsupported("separate q_bias/v_bias (BEiT-style qkv bias layout) unsupported")
    rotary = sorted(n for n in names if n in _ROTARY_NAMES)
    if rotary:
        raise Unsupported(f"rotary embedding present ({', '.join(rotary)})")
    rel = sorted(n for n in names if n in _REL_POS_NAMES)
    if rel:
        raise Unsupported(f"relative position bias present ({', '.join(rel)})")
    if own:
        raise Unsupported(f"holds its own parameters/buffers ({', '.join(sorted(own))}): role in forward unknown")


def _linear(module, name):
    child = module._modules.get(name)
    if child is None:
        raise Unsupported(f"no {name} submodule")
    if not isinstance(child, nn.Linear):
        raise Unsupported(f"{name} is {type(child).__name__}, not nn.Linear")
    return child


def _check_children(module, head_dim):
    for name, child in module._modules.items():
        if child is None or isinstance(child, nn.Identity):
            continue
        if name not in _KNOWN_CHILDREN:
            raise Unsupported(f"unrecognised submodule {name!r} ({type(child).__name__}): role in forward unknown")
        if name in ("q_norm", "k_norm"):
            shape = getattr(child, "normalized_shape", None)
            if shape is not None and tuple(shape) != (head_dim,):
                raise Unsupported(f"{name} normalises shape {tuple(shape)}, not the head dim ({head_dim},)")
        if name in ("attn_drop", "proj_drop") and not isinstance(child, nn.Dropout):
            raise Unsupported(f"{name} is {type(child).__name__}, not nn.Dropout")
    attn_drop = module._modules.get("attn_drop")
    if isinstance(attn_drop, nn.Dropout) and attn_drop.p > 0:
        raise Unsupported(f"attention dropout p={attn_drop.p} > 0: the fused attention has no dropout")
    for name in _DROP_FLOAT_NAMES:
        p = vars(module).get(name)
        if isinstance(p, float) and p > 0:
            raise Unsupported(f"dropout probability {name}={p} > 0: the fused attention has no dropout")


def _check_forward(module):
    if "forward" in vars(module):
        raise Unsupported("forward is overridden on the instance")
    if module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None):
        raise Unsupported("hooks are registered on the module")
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        raise Unsupported("forward signature cannot be read") from None
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in _ROTARY_NAMES:
            raise Unsupported(f"rotary embedding present (forward takes {p.name!r})")
        if p.default is p.empty:
            raise Unsupported(f"forward needs argument {p.name!r} beyond x")
        if p.default is not None:
            raise Unsupported(f"forward argument {p.name}={p.default!r} has a non-None default: semantics unknown")


def inspect_attention(module):
    """Return the AttentionSpec of a replaceable module, or raise Unsupported with the reason."""
    from ..layers.attention import Attention as FusedLayer
    if isinstance(module, (FusedLayer, WrapsOriginal)):
        raise Unsupported("already iwm_fast fused attention")
    qkv = _linear(module, "qkv")
    proj = _linear(module, "proj")
    dim = qkv.in_features
    if qkv.out_features != 3 * dim:
        raise Unsupported(f"qkv out_features {qkv.out_features} is not 3*dim ({3 * dim})")
    if proj.in_features != dim:
        raise Unsupported(f"proj in_features {proj.in_features} is not the attention width {dim}")
    _check_names(module)
    heads = next((getattr(module, n) for n in _HEAD_COUNT_NAMES
                  if isinstance(getattr(module, n, None), int) and not isinstance(getattr(module, n), bool)), None)
    if heads is None:
        raise Unsupported("num_heads missing")
    if heads <= 0 or dim % heads:
        raise Unsupported(f"attention width {dim} is not divisible by num_heads={heads}")
    head_dim = dim // heads
    declared = getattr(module, "head_dim", None)
    if declared is not None and declared != head_dim:
        raise Unsupported(f"head_dim {declared} is not dim/num_heads = {head_dim}")
    scale = getattr(module, "scale", None)
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)):
        raise Unsupported(f"scale is {type(scale).__name__}, not a number (learned temperature?)")
    _check_children(module, head_dim)
    _check_forward(module)
    return AttentionSpec(dim, heads, head_dim, float(scale) if scale is not None else head_dim ** -0.5,
                         scale is None)


def check_probe(out, ref, tol, what):
    """A stand-in's probe output must match the original's to ``tol`` (relative to its largest value)."""
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
    if not err <= tol:
        raise Unsupported(f"output differs from {what} (relative error {err:.3g} > {tol:g}): semantics not "
                          "recognised")


class WrapsOriginal(nn.Module):
    """A replacement layer that keeps the module it replaced in ``_iwm_original`` (a plain attribute, not a
    submodule) and reads through to it the plain attributes it lacks."""

    @property
    def original(self):
        return self._iwm_original

    def __getattr__(self, name):
        # Plain attributes the wrapper lacks (timm's fused_attn, V-JEPA's use_sdpa, ...) read through to the
        # original, so code that inspects the layer keeps working. Dunder and private lookups do not, which
        # keeps copy/pickle (they probe __setstate__ etc. on a half-built object) from recursing.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "_iwm_original" not in self.__dict__:
                raise
            return getattr(self.__dict__["_iwm_original"], name)


class PatchedAttention(WrapsOriginal):
    """Fused-attention stand-in that holds the original's submodules under the same names.

    The original module is kept outside the module tree (so parameters and state-dict keys are exactly those of
    the original) and is put back by ``unpatch_model``. Calls with extra non-None arguments (an attention mask,
    say) or an input that is not [B, N, C] go to the original forward unchanged. When the original returns
    ``(x, attn)`` (I-JEPA, V-JEPA) this returns ``(x, None)``: fused attention never materialises the weights.
    """

    def __init__(self, original, spec, backend):
        super().__init__()
        for name, child in original._modules.items():
            self.add_module(name, child)
        self.num_heads = spec.num_heads
        self.head_dim = spec.head_dim
        self.scale = spec.scale
        self.backend = backend
        self.returns_attn_tuple = False
        self.training = original.training
        object.__setattr__(self, "_iwm_original", original)  # plain attribute: not a submodule


    def _apply_child(self, name, t):
        child = self._modules.get(name)
        return t if child is None else child(t)

    def forward(self, x, *args, **kwargs):
        if args or any(v is not None for v in kwargs.values()) or x.dim() != 3:
            original = self._iwm_original
            original.training = self.training
            return original(x, *args, **kwargs)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self._apply_child("q_norm", q), self._apply_child("k_norm", k)
        out = attention(q, k, v, scale=self.scale, backend=self.backend)
        out = self._apply_child("norm", out.transpose(1, 2).reshape(B, N, C))
        out = self._apply_child("proj_drop", self.proj(out))
        return (out, None) if self.returns_attn_tuple else out

    def extra_repr(self):
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}, "
                f"replaces={type(self._iwm_original).__name__}")


def _first_output(out):
    if torch.is_tensor(out):
        return out, False
    if isinstance(out, (tuple, list)) and len(out) == 2 and torch.is_tensor(out[0]) \
            and (out[1] is None or torch.is_tensor(out[1])):
        return out[0], True
    raise Unsupported(f"forward returns {type(out).__name__}: return convention not recognised")


def probe(original, patched, spec):
    """Compare both forwards on random inputs in eval mode; set the return convention or raise Unsupported."""
    param = next(original.parameters())
    if param.device.type == "meta":
        raise Unsupported("parameters on the meta device: outputs cannot be checked")
    tol = _PROBE_TOL.get(param.dtype, 5e-2)
    modes = [(m, m.training) for m in original.modules()]
    gen = torch.Generator().manual_seed(0)  # own generator: patching must not move the user's RNG streams
    try:
        original.eval()
        patched.training = False
        no_autocast = torch.autocast(param.device.type, enabled=False) if param.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext()
        with torch.no_grad(), no_autocast:
            # Two input scales: small logits test the projections, large ones the softmax scale.
            for amplitude in (1.0, 4.0):
                x = (torch.randn(2, 7, spec.dim, generator=gen) * amplitude).to(param.device, param.dtype)
                try:
                    ref, tuple_out = _first_output(original(x))
                except Unsupported:
                    raise
                except Exception as e:  # a forward that cannot run on plain [B, N, C] input is not ours to replace
                    raise Unsupported(f"forward(x) on a [B, N, C] input failed: {type(e).__name__}: {e}") from None
                patched.returns_attn_tuple = tuple_out
                try:
                    out = patched(x)[0] if tuple_out else patched(x)
                except Exception as e:
                    raise Unsupported(f"fused forward failed (backend={patched.backend!r}): "
                                      f"{type(e).__name__}: {e}") from None
                if out.shape != ref.shape:
                    raise Unsupported(f"output shape {tuple(ref.shape)} differs from the fused {tuple(out.shape)}")
                check_probe(out, ref, tol, "the original forward on a probe input")
    finally:
        for m, mode in modes:
            m.training = mode
        patched.training = original.training
