"""timm: stand-ins for timm's own attention modules, with the fused attention and the fused rotary pass.

Recognised (by exact class): ``timm.layers.Attention`` (``vit_*`` incl. the register ViTs, DeiT and DeiT III),
``timm.layers.AttentionRope`` and ``timm.models.eva.EvaAttention`` (EVA-02 and the ``vit_*_rope_*`` ViTs). What
the stand-in computes, as timm does (read from its code, written anew here): the fused ``qkv`` projection or the
separate ``q_proj``/``k_proj``/``v_proj`` (EVA's ``q_bias``/``k_bias``/``v_bias`` added as timm adds them), the
per-head ``q_norm``/``k_norm``, grouped key/value heads repeated, ``is_causal``, the output ``norm``, the sigmoid
``gate``, ``proj`` and ``proj_drop``.

Rotary embeddings: timm hands each block ``rope``, sine and cosine tables concatenated ([N, 2D], or [B, 1, N, 2D]
after patch dropout) for the tokens after the ``num_prefix_tokens`` class/register tokens, in the interleaved
layout (channels 2i and 2i+1 turn together by one angle). The stand-in recovers each pair's angle with atan2 and
runs ``rope_attention`` with one axis per channel pair (the angle is the position, the frequency 1), the prefix
tokens at angle 0, which leaves them unrotated exactly. The first eager call with a new table checks that the
pairs do share their angles (one device sync per new table; under ``torch.compile`` the check is skipped).

Left alone at patch time: ``rotate_half=True`` (pairs i and i + D/2, a layout the rotary pass does not turn) and
models with per-head learnable frequencies (``rope_type='mixed'``). Handed to the original forward at call time
(reason logged once): an ``attn_mask``, attention dropout in training, a rotary table that takes gradients or has
a head axis, and a table whose pairs do not share their angles.
"""
import inspect
import sys
import weakref

import torch
import torch.nn.functional as F

from ..ops.attention import attention
from ..ops.rope import rope_attention
from ..patch.attention import Unsupported, WrapsOriginal, check_probe
from ..patch.report import say_once

_CHILDREN = ("qkv", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj",
             "proj_drop")
_OWN = ("q_bias", "k_bias", "v_bias")
_PROBE_TOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_CHECKED_TABLES = {}  # the last rotary table whose pairs were checked: weak reference and version


def _classes():
    """{class: takes rope} of timm's attention modules, when timm is imported."""
    if "timm" not in sys.modules:
        return {}
    from timm.layers.attention import Attention, AttentionRope
    from timm.models.eva import EvaAttention

    return {Attention: False, AttentionRope: True, EvaAttention: True}


def matches(module):
    return type(module) in _classes()


def _check_structure(module):
    extra = [n for n, c in module._modules.items() if c is not None and n not in _CHILDREN]
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    if extra or set(own) - set(_OWN):
        raise Unsupported(f"unrecognised submodules or parameters ({', '.join(extra + sorted(set(own) - set(_OWN)))})")
    if "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks:
        raise Unsupported("forward is overridden on the instance or hooks are registered")
    if getattr(module, "rotate_half", False):
        raise Unsupported("rotate_half=True: channel pairs (i, i + D/2), a layout the fused rotary pass does not turn")
    heads, kv_heads = module.num_heads, getattr(module, "num_kv_heads", module.num_heads)
    if heads % kv_heads:
        raise Unsupported(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")


class PatchedTimmAttention(WrapsOriginal):
    """Stand-in for timm's ``Attention`` (forward ``(x, attn_mask=None, is_causal=False)``)."""

    def __init__(self, original, backend):
        super().__init__()
        for name, child in original._modules.items():
            self.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
        self.num_heads, self.head_dim = original.num_heads, original.head_dim
        self.kv_groups = original.num_heads // getattr(original, "num_kv_heads", original.num_heads)
        self.scale, self.backend = float(original.scale), backend
        self.num_prefix_tokens = getattr(original, "num_prefix_tokens", 0)
        self.bias_separate = bool(getattr(original, "qkv_bias_separate", False))
        self.training = original.training
        object.__setattr__(self, "_iwm_original", original)

    def _project(self, x):
        B, N, _ = x.shape
        if self._modules.get("qkv") is None:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k, v = (getattr(self, n)(x).reshape(B, N, -1, self.head_dim).transpose(1, 2) for n in ("k_proj", "v_proj"))
        else:
            if getattr(self, "q_bias", None) is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = self.qkv(x) + bias if self.bias_separate else F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_groups > 1:
            k, v = k.repeat_interleave(self.kv_groups, 1), v.repeat_interleave(self.kv_groups, 1)
        return q, k, v

    def fused(self, x, rope=None, is_causal=False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self._modules.get("gate") is not None else None
        q, k, v = self._project(x)
        block = 1 if is_causal else None
        if rope is None:
            out = attention(q, k, v, scale=self.scale, block_causal=block, backend=self.backend)
        else:
            pos = pair_angles(rope, N)
            out = rope_attention(q, k, v, pos, axes=(2,) * (pos.shape[-1]), layout="interleaved", scale=self.scale,
                                 block_causal=block, backend=self.backend)
        out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def _unsupported(self, x, rope, attn_mask):
        if attn_mask is not None:
            return "an attn_mask was given"
        if self.training and self.attn_drop.p > 0:
            return f"attention dropout p={self.attn_drop.p} in training"
        if x.dim() != 3:
            return f"input of {x.dim()} dims, not [B, N, C]"
        return None if rope is None else _rope_unsupported(rope, x.shape[1] - self.num_prefix_tokens)

    def _run(self, x, rope, attn_mask, is_causal, call):
        reason = self._unsupported(x, rope, attn_mask)
        if reason is None:
            return self.fused(x, rope, is_causal)
        say_once(f"iwm_fast.patch: {type(self._iwm_original).__name__}: {reason}; such calls run the original module")
        original = self._iwm_original
        original.training = self.training
        return original(x, **call)

    def forward(self, x, attn_mask=None, is_causal=False):
        return self._run(x, None, attn_mask, is_causal, dict(attn_mask=attn_mask, is_causal=is_causal))

    def extra_repr(self):
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}, "
                f"replaces={type(self._iwm_original).__name__}")


class PatchedTimmRopeAttention(PatchedTimmAttention):
    """Stand-in for timm's ``AttentionRope`` and ``EvaAttention`` (forward ``(x, rope=None, attn_mask=None,
    is_causal=False)``)."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        return self._run(x, rope, attn_mask, is_causal, dict(rope=rope, attn_mask=attn_mask, is_causal=is_causal))


def _rope_unsupported(rope, n_rotated):
    if rope.requires_grad and torch.is_grad_enabled():
        return "the rotary table takes gradients (learned frequencies)"
    if rope.dim() not in (2, 4) or rope.dim() == 4 and rope.shape[1] != 1:
        return f"rotary table of shape {tuple(rope.shape)} (per-head angles)"
    if rope.shape[-2] != n_rotated or rope.shape[-1] % 4:
        return f"rotary table of shape {tuple(rope.shape)} for {n_rotated} rotated tokens"
    if torch.compiler.is_compiling() or _already_checked(rope):
        return None
    sin, cos = rope.chunk(2, -1)
    if not (torch.equal(sin[..., 0::2], sin[..., 1::2]) and torch.equal(cos[..., 0::2], cos[..., 1::2])):
        return "rotary table whose channel pairs do not share one angle"
    _CHECKED_TABLES["last"] = (weakref.ref(rope), rope._version)
    return None


def _already_checked(rope):
    last = _CHECKED_TABLES.get("last")
    return last is not None and last[0]() is rope and last[1] == rope._version


def pair_angles(rope, n_tokens):
    """[B or 1, N, D/2] float32 angle of each channel pair of each token from timm's [..., N - P, 2D] sin/cos
    table, the P prefix tokens at angle 0."""
    sin, cos = rope.chunk(2, -1)
    theta = torch.atan2(sin[..., 0::2].float(), cos[..., 0::2].float())
    theta = theta.reshape(-1, theta.shape[-2], theta.shape[-1])
    return F.pad(theta, (0, 0, n_tokens - theta.shape[-2], 0))


def _probe_table(n, head_dim, gen, device, dtype):
    theta = (torch.rand(n, head_dim // 2, generator=gen) * 12 - 6).repeat_interleave(2, -1)
    return torch.cat([theta.sin(), theta.cos()], -1).to(device, dtype)


def probe_timm(original, patched, rotary):
    """Original and stand-in on random inputs (with a random interleaved rotary table for rope classes)."""
    param = next(original.parameters())
    if param.device.type == "meta":
        raise Unsupported("parameters on the meta device: outputs cannot be checked")
    tol = _PROBE_TOL.get(param.dtype, 5e-2)
    gen = torch.Generator().manual_seed(0)  # own generator: patching must not move the user's RNG streams
    dim, prefix = original.qkv.in_features if original.qkv is not None else original.q_proj.in_features, \
        patched.num_prefix_tokens
    modes = [(m, m.training) for m in original.modules()]
    try:
        original.eval()
        with torch.no_grad():
            for amplitude in (1.0, 4.0):
                x = (torch.randn(2, prefix + 12, dim, generator=gen) * amplitude).to(param.device, param.dtype)
                kw = dict(rope=_probe_table(12, patched.head_dim, gen, param.device, param.dtype)) if rotary else {}
                ref = original(x, **kw)
                check_probe(patched.fused(x, kw.get("rope")), ref, tol, "the original on a probe input")
    finally:
        for m, mode in modes:
            m.training = mode


def build(module, backend, root):
    """(stand-in, report detail) for one of timm's attention modules, or raise Unsupported."""
    rotary = _classes()[type(module)]
    _check_structure(module)
    if not _signature_ok(module, rotary):
        raise Unsupported(f"forward{tuple(inspect.signature(type(module).forward).parameters)[1:]} is not timm's")
    if rotary and getattr(root, "rope_mixed", False):
        raise Unsupported("per-head learnable rotary frequencies (rope_type='mixed'): the fused rotary pass turns "
                          "all heads of a token by one angle and gives the frequencies no gradient")
    patched = (PatchedTimmRopeAttention if rotary else PatchedTimmAttention)(module, backend)
    probe_timm(module, patched, rotary)
    detail = f"heads={patched.num_heads}, head_dim={patched.head_dim}"
    if patched.kv_groups > 1:
        detail += f", {patched.num_heads // patched.kv_groups} key/value heads"
    if rotary:
        detail += f", rotary tables through the fused rotary pass (interleaved pairs, {patched.num_prefix_tokens} " \
                  "prefix tokens unrotated)"
    return patched, detail


def _signature_ok(module, rotary):
    names = tuple(inspect.signature(type(module).forward).parameters)[1:]
    return names == (("x", "rope", "attn_mask", "is_causal") if rotary else ("x", "attn_mask", "is_causal"))
