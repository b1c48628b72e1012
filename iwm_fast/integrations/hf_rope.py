"""transformers' ``VJEPA2RopeAttention`` with the fused rotary pass (``iwm_fast.ops.rope_attention``).

transformers' V-JEPA 2 rotates q and k in the module, with separate ``query``/``key``/``value`` projections, and
only then calls the attention function; so ``"iwm_fast"`` alone speeds up the attention but not the rotation.
The stand-in keeps the module's submodules and forward signature ``(hidden_states, position_mask=None)`` and
computes what transformers does (read from its code, written anew here):

- token ids: ``position_mask`` ([B, N], the kept tokens of a masked clip) or 0..N-1, split into (frame, row,
  column) on the ``grid_size`` x ``grid_size`` grid of the config's crop;
- rotation: ``d_dim = h_dim = w_dim`` channels per axis, V-JEPA 2's frequency layout (``layout="vjepa2"``), the
  remaining channels unrotated; attention scale ``head_dim ** -0.5``; it returns ``(output, None)``.

It hands the call to the original module (reason logged once) when the model is set to another attention
implementation (``"eager"`` for attention weights, say), in training with attention dropout, and for inputs that
are not [B, N, C] with a [B, N] integer ``position_mask``. At patch time a probe compares both on random inputs,
with and without a position mask, at two input scales.
"""
import inspect

import torch
import torch.nn as nn

from ..ops.rope import rope_attention
from ..patch.attention import Unsupported, WrapsOriginal, check_probe
from ..patch.report import say_once
from .hf import NAME

CLASS_NAME = "VJEPA2RopeAttention"
_CHILDREN = ("query", "key", "value", "proj", "dropout")
_ATTRS = ("num_attention_heads", "attention_head_size", "d_dim", "h_dim", "w_dim", "grid_size", "scaling",
          "dropout_prob", "is_causal", "config")
_PROBE_TOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def matches(module):
    cls = type(module)
    return cls.__name__ == CLASS_NAME and cls.__module__.startswith("transformers.")


def _check_linears(module, width):
    for name in ("query", "key", "value", "proj"):
        child = module._modules.get(name)
        if not isinstance(child, nn.Linear) or child.in_features != width or child.out_features != width:
            raise Unsupported(f"{name} is not an nn.Linear({width}, {width})")


def inspect_hf_rope(module):
    """The rotary axes (d_dim, h_dim, w_dim) of a transformers V-JEPA 2 rope attention, or raise Unsupported."""
    missing = [a for a in _ATTRS if not hasattr(module, a)]
    if missing:
        raise Unsupported(f"not transformers' V-JEPA 2 layout (no {', '.join(missing)})")
    heads, head_dim = module.num_attention_heads, module.attention_head_size
    _check_linears(module, heads * head_dim)
    axes = (module.d_dim, module.h_dim, module.w_dim)
    if any(not isinstance(a, int) or a < 0 or a % 2 for a in axes) or sum(axes) > head_dim:
        raise Unsupported(f"axis channels {axes} are not even counts within head_dim {head_dim}")
    if module.is_causal:
        raise Unsupported("is_causal=True: transformers' V-JEPA 2 attention is bidirectional")
    extra = [n for n, c in module._modules.items() if c is not None and n not in _CHILDREN]
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    if extra or own:
        raise Unsupported(f"unrecognised submodules or parameters ({', '.join(extra + own)})")
    if "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks:
        raise Unsupported("forward is overridden on the instance or hooks are registered")
    names = tuple(inspect.signature(type(module).forward).parameters)[1:]
    if names != ("hidden_states", "position_mask"):
        raise Unsupported(f"forward{names} is not (hidden_states, position_mask)")
    return axes


class PatchedHFRopeAttention(WrapsOriginal):
    """Stand-in for transformers' ``VJEPA2RopeAttention``; see the module docstring."""

    def __init__(self, original, axes, backend):
        super().__init__()
        for name, child in original._modules.items():
            self.add_module(name, child)
        self.axes, self.backend = axes, backend
        self.num_heads, self.head_dim = original.num_attention_heads, original.attention_head_size
        self.grid_size, self.scaling = int(original.grid_size), float(original.scaling)
        self.training = original.training
        object.__setattr__(self, "_iwm_original", original)

    def _positions(self, position_mask, n, device):
        """[B or 1, N, 3] float32 (frame, row, column) of each token, as transformers splits its ids."""
        ids = torch.arange(n, device=device)[None] if position_mask is None else position_mask
        per_frame = self.grid_size * self.grid_size
        frame = ids // per_frame
        row = (ids - per_frame * frame) // self.grid_size
        col = ids - per_frame * frame - self.grid_size * row
        return torch.stack((frame, row, col), -1).to(torch.float32)

    def fused(self, hidden_states, position_mask=None):
        B, N, _ = hidden_states.shape
        shape = (B, N, self.num_heads, self.head_dim)
        q, k, v = (getattr(self, n)(hidden_states).view(shape).transpose(1, 2) for n in ("query", "key", "value"))
        pos = self._positions(position_mask, N, hidden_states.device)
        out = rope_attention(q, k, v, pos, axes=self.axes, layout="vjepa2", scale=self.scaling, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))

    def _unsupported(self, hidden_states, position_mask):
        original = self._iwm_original
        if original.config._attn_implementation != NAME:
            return f"the model's attention implementation is {original.config._attn_implementation!r}"
        if self.training and original.dropout_prob > 0:
            return f"attention dropout p={original.dropout_prob} in training"
        if hidden_states.dim() != 3:
            return f"input of {hidden_states.dim()} dims, not [B, N, C]"
        if position_mask is not None and (position_mask.shape != hidden_states.shape[:2]
                                          or position_mask.dtype.is_floating_point):
            return "position_mask is not a [B, N] integer tensor"
        return None

    def forward(self, hidden_states, position_mask=None):
        reason = self._unsupported(hidden_states, position_mask)
        if reason is None:
            return self.fused(hidden_states, position_mask), None
        say_once(f"iwm_fast.patch: {CLASS_NAME}: {reason}; such calls run the original module")
        original = self._iwm_original
        original.training = self.training
        return original(hidden_states, position_mask=position_mask)

    def extra_repr(self):
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, axes={self.axes}, backend={self.backend!r}, "
                f"replaces={CLASS_NAME}")


def probe_hf_rope(original, patched):
    """Original and stand-in on random clips with and without a position mask, at two scales (eval mode)."""
    param = next(original.parameters())
    if param.device.type == "meta":
        raise Unsupported("parameters on the meta device: outputs cannot be checked")
    tol = _PROBE_TOL.get(param.dtype, 5e-2)
    gen = torch.Generator().manual_seed(0)  # own generator: patching must not move the user's RNG streams
    width, n = patched.num_heads * patched.head_dim, 2 * patched.grid_size ** 2
    ids = torch.stack([torch.randperm(n, generator=gen)[:9].sort().values for _ in range(2)]).to(param.device)
    modes = [(m, m.training) for m in original.modules()]
    try:
        original.eval()
        with torch.no_grad():
            for mask in (None, ids):
                x = torch.randn(2, n if mask is None else 9, width, generator=gen).to(param.device, param.dtype)
                for amplitude in (1.0, 4.0):
                    ref = original(x * amplitude, position_mask=mask)[0]
                    check_probe(patched.fused(x * amplitude, mask), ref, tol, "the original on a probe clip")
    finally:
        for m, mode in modes:
            m.training = mode


def build(module, backend, root):
    """(stand-in, report detail) for a transformers V-JEPA 2 rope attention, or raise Unsupported."""
    axes = inspect_hf_rope(module)
    patched = PatchedHFRopeAttention(module, axes, backend)
    probe_hf_rope(module, patched)
    return patched, (f"heads={patched.num_heads}, head_dim={patched.head_dim}, fused rotary pass, axes {axes} "
                     f"(V-JEPA 2 layout), grid_size={patched.grid_size}, then the {NAME!r} attention")
