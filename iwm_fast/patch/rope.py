"""Recognise V-JEPA 2's rotary attention modules (``RoPEAttention``, ``ACRoPEAttention``) and stand in for them.

What the stand-in reproduces (read from V-JEPA 2's public code, re-implemented here):

- positions: flat token ids (``mask``, [B, N], for a masked subset; else 0..N-1) split into (frame, row, column)
  with ``H_patches``/``W_patches`` (``H``/``W`` for ACRoPE) or ``grid_size`` when those are not given;
  ACRoPE scales rows and columns by ``grid_size / H`` and ``grid_size / W``;
- rotation: ``d_dim``, ``h_dim``, ``w_dim`` channels for the three axes, the rest unrotated, V-JEPA 2's
  frequency layout (``iwm_fast.ops.rope``, layout ``"vjepa2"``);
- ACRoPE's action tokens (``action_tokens`` per frame, laid out [T, A + H*W]): only their depth channels rotate,
  by their frame index; everything else of theirs is unrotated (position 0 is the identity rotation);
- attention: SDPA's default scale when the original calls SDPA (``use_sdpa`` or an ``attn_mask``), its
  ``scale`` otherwise; ``is_causal`` as causal attention; an ``attn_mask`` that is V-JEPA 2-AC's frame-causal
  mask runs our kernel in block-causal mode (checked once per mask tensor), any other mask goes to SDPA with
  our rotation.

Guards: the module must match V-JEPA 2's structure (attributes, children, forward signature, no dropout); a
probe runs original and stand-in at patch time on arguments shaped like the real ones; and the first real call
of every kind (mask or not, attn_mask kind, T/H/W, action tokens) is run through both in eager mode: a mismatch
hands that kind of call back to the original for good, with a warning.
"""
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import block_causal_mask
from ..ops.rope import apply_rope, rope_attention
from .attention import Unsupported, WrapsOriginal, _linear, check_probe

log = logging.getLogger("iwm_fast")

ROPE_CLASSES = {"RoPEAttention": ("x", "mask", "attn_mask", "T", "H_patches", "W_patches"),
                "ACRoPEAttention": ("x", "mask", "attn_mask", "T", "H", "W", "action_tokens")}
_CHILDREN = ("qkv", "proj", "attn_drop", "proj_drop")
_PROBE_TOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# The last frame-causal mask tensor seen per frame size, verified once (a weak reference: never kept alive).
_VERIFIED_MASKS = {}


@dataclass(frozen=True)
class RopeSpec:
    kind: str           # "RoPEAttention" or "ACRoPEAttention"
    dim: int
    num_heads: int
    head_dim: int
    axes: tuple         # (d_dim, h_dim, w_dim)
    grid_size: int


def _rope_kind(module):
    """'RoPEAttention' / 'ACRoPEAttention' when the module's class or one of its bases has that name, else None."""
    return next((c.__name__ for c in type(module).__mro__ if c.__name__ in ROPE_CLASSES), None)


def is_vjepa2_rope(module):
    return _rope_kind(module) is not None


def inspect_rope(module):
    """RopeSpec of a V-JEPA 2 rotary attention module, or raise Unsupported with the reason."""
    kind = _rope_kind(module)
    why = f"rotary embedding present (class {type(module).__name__}): "
    qkv, proj = _linear(module, "qkv"), _linear(module, "proj")
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or proj.in_features != dim:
        raise Unsupported(why + f"qkv {qkv.in_features}->{qkv.out_features} / proj {proj.in_features} is not "
                          "V-JEPA 2's dim->3*dim / dim")
    attrs = ("num_heads", "head_dim", "d_dim", "h_dim", "w_dim", "grid_size", "use_sdpa", "is_causal", "scale",
             "proj_drop_prob")
    missing = [a for a in attrs if not hasattr(module, a)]
    if missing:
        raise Unsupported(why + f"not V-JEPA 2's layout (no {', '.join(missing)})")
    heads, head_dim = module.num_heads, module.head_dim
    if not isinstance(heads, int) or heads <= 0 or dim % heads or head_dim != dim // heads:
        raise Unsupported(why + f"num_heads={heads}, head_dim={head_dim} do not split width {dim}")
    axes = (module.d_dim, module.h_dim, module.w_dim)
    if any(not isinstance(a, int) or a < 0 or a % 2 for a in axes) or sum(axes) > head_dim:
        raise Unsupported(why + f"axis channels {axes} are not even counts within head_dim {head_dim}")
    if not isinstance(module.grid_size, int) or module.grid_size <= 0:
        raise Unsupported(why + f"grid_size={module.grid_size!r} is not a positive int")
    for name, child in module._modules.items():
        if child is not None and name not in _CHILDREN and not isinstance(child, nn.Identity):
            raise Unsupported(why + f"unrecognised submodule {name!r} ({type(child).__name__})")
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    if own:
        raise Unsupported(why + f"holds its own parameters/buffers ({', '.join(own)})")
    if module.proj_drop_prob:
        raise Unsupported(f"dropout probability proj_drop_prob={module.proj_drop_prob} > 0 (handed to SDPA as "
                          "attention dropout): the fused attention has no dropout")
    drop = module._modules.get("attn_drop")
    if isinstance(drop, nn.Dropout) and drop.p > 0:
        raise Unsupported(f"attention dropout p={drop.p} > 0: the fused attention has no dropout")
    if "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks:
        raise Unsupported(why + "forward is overridden on the instance or hooks are registered")
    names = tuple(inspect.signature(type(module).forward).parameters)[1:]
    if names != ROPE_CLASSES[kind]:
        raise Unsupported(why + f"forward{names} is not V-JEPA 2's {kind}.forward{ROPE_CLASSES[kind]}")
    return RopeSpec(kind, dim, heads, head_dim, axes, module.grid_size)


class _Fallback(Exception):
    """This call is one the stand-in does not reproduce: run the original forward."""


def _split_ids(ids, tokens_per_frame, tokens_per_row):
    frame = ids // tokens_per_frame
    row = (ids - tokens_per_frame * frame) // tokens_per_row
    col = ids - tokens_per_frame * frame - tokens_per_row * row
    return frame, row, col


def _is_frame_causal(attn_mask, n, frame):
    """Whether attn_mask is the [n, n] boolean frame-causal mask with ``frame`` tokens per frame."""
    if attn_mask.dtype != torch.bool or tuple(attn_mask.shape[-2:]) != (n, n) or attn_mask.dim() > 2 and \
            any(s != 1 for s in attn_mask.shape[:-2]):
        return False
    cached = _VERIFIED_MASKS.get(frame)
    if cached is not None and cached[0]() is attn_mask and cached[1] == attn_mask._version:
        return True
    ok = torch.equal(attn_mask.reshape(n, n), block_causal_mask(n, n, frame, attn_mask.device))
    if ok:
        _VERIFIED_MASKS[frame] = (weakref.ref(attn_mask), attn_mask._version)
    return ok


class _PatchedRotary(WrapsOriginal):
    """Stand-in for V-JEPA 2's RoPEAttention / ACRoPEAttention: same submodules and parameters, fused rotary
    attention (``iwm_fast.ops.rope_attention``; block-causal kernel for V-JEPA 2-AC's mask)."""

    def __init__(self, original, spec, backend):
        nn.Module.__init__(self)  # not the original class's __init__, which is next in the MRO
        for name, child in original._modules.items():
            self.add_module(name, child)
        self.spec = spec
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.backend = backend
        self.training = original.training
        self.verify_calls = True  # compare the first real call of each kind with the original (eager only)
        object.__setattr__(self, "_iwm_original", original)
        object.__setattr__(self, "_checked", {})  # call kind -> True (matches) / False (handed back)

    # ---- positions, as the original computes them ----------------------------------------------------------
    def _positions(self, x, mask, T, H, W):
        """[B or 1, N_frame_tokens, 3] float32 positions of the frame tokens."""
        orig, gs = self._iwm_original, self.spec.grid_size
        if self.spec.kind == "RoPEAttention":
            if H is None or W is None:
                per_frame, per_row = gs * gs, gs
            else:
                per_frame, per_row = int(H * W), W
            if mask is None:
                n = int(T * H * W) if None not in (T, H, W) else int(x.shape[1] // (gs * gs)) * gs * gs
                mask = torch.arange(n, device=x.device)
            return torch.stack(_split_ids(mask, per_frame, per_row), -1).to(torch.float32).reshape(
                -1, mask.shape[-1], 3)
        if H is None or W is None:
            raise _Fallback
        if mask is None:
            if T is None:
                raise _Fallback
            mask = torch.arange(int(T * H * W), device=x.device)
        d, h, w = (1.0 * t for t in _split_ids(mask, int(H * W), W))
        h = h * (orig.grid_size / H)
        w = w * (orig.grid_size / W)
        return torch.stack((d, h, w), -1).reshape(-1, mask.shape[-1], 3)

    def _sequence_positions(self, x, mask, T, H, W, action_tokens):
        """Positions of every token of x, in x's order (action tokens: frame index, then 0, 0)."""
        pos = self._positions(x, mask, T, H, W)
        if not action_tokens:
            return pos
        if mask is not None:
            raise _Fallback  # V-JEPA 2: "action tokens do not work with masking"
        frames = pos.reshape(T, H * W, 3)
        act = torch.zeros(T, action_tokens, 3, device=x.device)
        act[..., 0] = torch.arange(T, device=x.device, dtype=torch.float32)[:, None]
        return torch.cat([act, frames], 1).reshape(1, -1, 3)

    # ---- the fused forward ---------------------------------------------------------------------------------
    def _fused(self, x, mask, attn_mask, T, H, W, action_tokens):
        orig, spec = self._iwm_original, self.spec
        if x.dim() != 3 or x.shape[-1] != spec.dim:
            raise _Fallback
        B, N, C = x.shape
        if mask is not None and (mask.dim() != 2 or mask.shape != (B, N) or mask.dtype.is_floating_point):
            raise _Fallback
        pos = self._sequence_positions(x, mask, T, H, W, action_tokens)
        if pos.shape[1] != N:
            raise _Fallback  # the original's shapes would not line up either: let it raise its own error
        sdpa = attn_mask is not None or orig.use_sdpa
        scale = None if sdpa else orig.scale
        causal = bool(orig.is_causal) and sdpa
        q, k, v = self.qkv(x).unflatten(-1, (3, spec.num_heads, -1)).permute(2, 0, 3, 1, 4)
        block = 1 if causal else None
        if attn_mask is not None:
            frame = action_tokens + int(H * W) if None not in (H, W) else None
            if causal or torch.compiler.is_compiling() or frame is None or not _is_frame_causal(attn_mask, N, frame):
                # A generic dense mask (or one that cannot be checked while compiling): our rotation, then SDPA
                # with the mask, as the original does.
                rope_backend = self.backend if self.backend in ("auto", "triton") else "torch"
                q, k = (apply_rope(t, pos, axes=spec.axes, backend=rope_backend) for t in (q, k))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
                return self._project(out, B, N, C)
            block = frame
        out = rope_attention(q, k, v, pos, axes=spec.axes, layout="vjepa2", scale=scale, block_causal=block,
                             backend=self.backend)
        return self._project(out, B, N, C)

    def _project(self, out, B, N, C):
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(out) if self._modules.get("proj_drop") is not None else out

    def _call_original(self, *args, **kwargs):
        original = self._iwm_original
        original.training = self.training
        return original(*args, **kwargs)

    def _run(self, call, args, kwargs):
        """call: (x, mask, attn_mask, T, H, W, action_tokens); args/kwargs: as given, for the original."""
        x, mask, attn_mask, T, H, W, action_tokens = call
        am = None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape))
        kind = (mask is None, am, T, H, W, action_tokens, x.dtype, x.device.type)
        checked = self._checked.get(kind)
        if checked is False:
            return self._call_original(*args, **kwargs)
        try:
            if checked is None and self.verify_calls and not torch.compiler.is_compiling():
                self._verify(kind, call, args, kwargs)
                if self._checked[kind] is False:
                    return self._call_original(*args, **kwargs)
            return self._fused(*call)
        except _Fallback:
            return self._call_original(*args, **kwargs)

    def _verify(self, kind, call, args, kwargs):
        """Run this first call of its kind through both (eval mode, no grad); a mismatch hands it back."""
        modes = [(m, m.training) for m in self._iwm_original.modules()]
        try:
            self._iwm_original.eval()
            with torch.no_grad():
                ref = self._iwm_original(*args, **kwargs)
                got = self._fused(*call)
        except _Fallback:
            self._checked[kind] = True  # such calls always run the original: nothing to compare
            return
        finally:
            for m, mode in modes:
                m.training = mode
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
        tol = _PROBE_TOL.get(ref.dtype, 5e-2)
        self._checked[kind] = bool(err <= tol)
        if not self._checked[kind]:
            log.warning("iwm_fast.patch: %s differs from the original on a real call (relative error %.3g > %g); "
                        "calls of this kind now run the original forward", self.spec.kind, err, tol)

    def extra_repr(self):
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, axes={self.spec.axes}, "
                f"backend={self.backend!r}, replaces={self.spec.kind}")


class PatchedRoPEAttention(_PatchedRotary):
    """Stand-in for V-JEPA 2's RoPEAttention (encoders, predictor); its forward signature."""

    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        return self._run((x, mask, attn_mask, T, H_patches, W_patches, 0), (x,),
                         dict(mask=mask, attn_mask=attn_mask, T=T, H_patches=H_patches, W_patches=W_patches))


class PatchedACRoPEAttention(_PatchedRotary):
    """Stand-in for V-JEPA 2-AC's ACRoPEAttention (action-conditioned predictor); its forward signature."""

    def forward(self, x, mask=None, attn_mask=None, T=None, H=None, W=None, action_tokens=0):
        return self._run((x, mask, attn_mask, T, H, W, action_tokens), (x,),
                         dict(mask=mask, attn_mask=attn_mask, T=T, H=H, W=W, action_tokens=action_tokens))


_CLASSES = {}


def make_patched_rope(original, spec, backend):
    """The stand-in, as an instance of a subclass of both our stand-in class and the original's class: V-JEPA 2's
    ACBlock picks its call by ``isinstance(self.attn, ACRoPEAttention)``, which must stay true."""
    base = PatchedRoPEAttention if spec.kind == "RoPEAttention" else PatchedACRoPEAttention
    orig_cls = type(original)
    if orig_cls not in _CLASSES:
        _CLASSES[orig_cls] = type(base.__name__, (base, orig_cls), {"__module__": __name__,
                                                                   "__reduce_ex__": _reduce_ex})
    return _CLASSES[orig_cls](original, spec, backend)


def _reduce_ex(self, protocol):
    # The class above is made at run time, so pickle (torch.save, deepcopy) rebuilds the stand-in from the
    # original module instead of looking the class up by name.
    return _rebuild, (self._iwm_original, self.backend, self.verify_calls, self.training)


def _rebuild(original, backend, verify_calls, training):
    patched = make_patched_rope(original, inspect_rope(original), backend)
    patched.verify_calls = verify_calls
    patched.train(training)
    return patched


def _probe_calls(spec, device, dtype, gen):
    """Arguments shaped like V-JEPA 2's real calls, on a small grid: (label, args)."""
    def rand(*shape):  # drawn on the CPU (the generator's device), whatever the default device
        return torch.randn(*shape, generator=gen, device="cpu").to(device, dtype)

    gs = spec.grid_size
    if spec.kind == "RoPEAttention":
        T, H, W = 2, 3, 4
        ids = torch.stack([torch.randperm(T * H * W, generator=gen, device="cpu")[:10].sort().values
                           for _ in range(2)])
        return [("encoder, full clip", (rand(2, T * H * W, spec.dim), None, None, T, H, W)),
                ("encoder/predictor, masked tokens", (rand(2, 10, spec.dim), ids.to(device), None, T, H, W)),
                ("image, grid_size positions", (rand(1, gs * gs, spec.dim), None, None, None, None, None))]
    T, H, W, A = 2, 3, 3, 2
    n = T * (A + H * W)
    return [("AC predictor, action tokens + frame-causal mask",
             (rand(2, n, spec.dim), None, block_causal_mask(n, n, A + H * W, device), T, H, W, A)),
            ("frames only", (rand(2, T * H * W, spec.dim), None, None, T, H, W, 0))]


def probe_rope(original, patched):
    """Compare original and stand-in on V-JEPA 2-shaped calls at two input scales; raise Unsupported if they
    differ."""
    param = next(original.parameters())
    if param.device.type == "meta":
        raise Unsupported("parameters on the meta device: outputs cannot be checked")
    tol = _PROBE_TOL.get(param.dtype, 5e-2)
    gen = torch.Generator().manual_seed(0)
    modes = [(m, m.training) for m in original.modules()]
    try:
        original.eval()
        patched.training = False
        with torch.no_grad():
            for label, args in _probe_calls(patched.spec, param.device, param.dtype, gen):
                for amplitude in (1.0, 4.0):
                    args = (args[0] * amplitude,) + args[1:]
                    try:
                        ref = original(*args)
                    except Exception as e:
                        raise Unsupported(f"original forward failed on a V-JEPA 2-shaped call ({label}): "
                                          f"{type(e).__name__}: {e}") from None
                    try:
                        out = patched._fused(*args[:6], args[6] if len(args) > 6 else 0)
                    except _Fallback:
                        raise Unsupported(f"stand-in does not take the call ({label})") from None
                    check_probe(out, ref, tol, f"the original on a probe call ({label})")
    finally:
        for m, mode in modes:
            m.training = mode
        patched.training = original.training
