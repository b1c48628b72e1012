"""Rotary-attention rows of the attention benchmark (V-JEPA 2's shapes; the full run only).

Providers: ``triton`` is ``ops.rope_attention`` (one fused rotary launch for q and k, then the kernel;
block-causal for V-JEPA 2-AC's predictor), ``triton_rope+sdpa`` our rotary pass followed by SDPA (isolates the
rotation), ``vjepa2_path`` the rotation as V-JEPA 2 does it in PyTorch (sines and cosines built on every call,
per-axis slices, concatenations) followed by SDPA with its dense boolean mask for the AC predictor. Metrics:
``ms_fwd``/``ms_bwd``/``ms_fwdbwd`` and ``speedup_vs_vjepa2`` (``_fwd``, ``_bwd``), all measured in one run. On
the CPU they only check correctness (``max_rel_err_vs_vjepa2``: our output against the V-JEPA 2-style path).
"""
import os

import torch
import torch.nn.functional as F

from ..ops.attention import block_causal_mask
from ..ops.rope import apply_rope, grid_positions, rope_attention, vjepa2_axes
from . import harness

ROPE_KERNEL = "rope_attention"
# (name, B, H, D, (T, H, W) token grid, action tokens per frame). 16 frames at 256 px, tubelet 2, patch 16:
# an 8 x 16 x 16 grid, N = 2048. The AC predictor adds 2 action tokens per frame (N = 2064) and is frame-causal.
CUDA_ROPE_SHAPES = [
    ("vjepa2_vitl_16f256", 4, 16, 64, (8, 16, 16), 0),    # ViT-L encoder: 16 heads of 64
    ("vjepa2_vitg_16f256", 4, 16, 88, (8, 16, 16), 0),    # ViT-g encoder: 16 heads of 88
    ("vjepa2_pred_16f256", 4, 12, 32, (8, 16, 16), 0),    # predictor, 384 wide: 12 heads of 32
    ("vjepa2ac_pred_8x256", 2, 16, 64, (8, 16, 16), 2),   # V-JEPA 2-AC predictor, 1024 wide, frame-causal
]
CPU_ROPE_SHAPES = [("tiny_rope_d40", 1, 2, 40, (2, 3, 4), 0), ("tiny_ac_d24", 1, 2, 24, (2, 3, 3), 2)]
def _vjepa2_style_rotate(x, pos, axes):
    """The rotation as V-JEPA 2 computes it, in PyTorch: per axis, frequencies and sin/cos built on every call,
    half-frequencies repeated across the vector, pairs turned by a stack, parts concatenated."""
    parts, start = [], 0
    for a, d in enumerate(axes):
        xs = x[..., start:start + d]
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=x.dtype, device=x.device) / (d / 2.0))
        freq = pos[..., a][..., None].to(x.dtype) * omega
        sin, cos = freq.sin().repeat(1, 1, 2)[:, None], freq.cos().repeat(1, 1, 2)[:, None]
        pairs = xs.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
        parts.append(xs * cos + turned * sin)
        start += d
    parts.append(x[..., start:])
    return torch.cat(parts, -1)


def _ac_positions(grid, action_tokens, device):
    """Positions of V-JEPA 2-AC's sequence [T, A + H*W]: action tokens (t, 0, 0), patches (t, h, w)."""
    T, Hg, Wg = grid
    frames = grid_positions(torch.arange(T * Hg * Wg, device=device), grid).reshape(T, Hg * Wg, 3)
    act = torch.zeros(T, action_tokens, 3, device=device)
    act[..., 0] = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    return torch.cat([act, frames], 1).reshape(1, -1, 3)


def rope_providers(device, grid, action_tokens, D):
    """({name: fn(q, k, v)}, N) for one rotary shape."""
    T, Hg, Wg = grid
    if action_tokens:
        pos = _ac_positions(grid, action_tokens, device)
        frame = action_tokens + Hg * Wg
    else:
        pos = grid_positions(torch.arange(T * Hg * Wg, device=device), grid)[None]
        frame = None
    N = pos.shape[1]
    mask = block_causal_mask(N, N, frame, device) if frame else None
    axes = vjepa2_axes(D)
    found = {}
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if torch.device(device).type == "cuda" or interp:
        found["triton"] = lambda q, k, v: rope_attention(q, k, v, pos, axes=axes, block_causal=frame,
                                                         backend="triton")
        found["triton_rope+sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            apply_rope(q, pos, axes=axes, backend="triton"), apply_rope(k, pos, axes=axes, backend="triton"), v,
            attn_mask=mask)
    found["vjepa2_path"] = lambda q, k, v: F.scaled_dot_product_attention(
        _vjepa2_style_rotate(q, pos, axes), _vjepa2_style_rotate(k, pos, axes), v, attn_mask=mask)
    return found, N


def _inputs(B, H, N, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype) for _ in range(4))
    return [t.requires_grad_(True) for t in (q, k, v)], do


def _correctness_rows(provs, shape, B, H, N, D, device, meta):
    (q, k, v), _ = _inputs(B, H, N, D, torch.float32, device)
    want = provs["vjepa2_path"](q, k, v)
    for pname, fn in provs.items():
        if pname != "vjepa2_path":
            err = ((fn(q, k, v) - want).abs().max() / want.abs().max()).item()
            yield harness.row(ROPE_KERNEL, pname, shape, torch.float32, "max_rel_err_vs_vjepa2", (err,) * 3, meta)


def _timed_rows(provs, shape, B, H, N, D, dtype, device, meta):
    results = {}
    for pname, fn in provs.items():
        (q, k, v), do = _inputs(B, H, N, D, dtype, device)
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        out = fn(q, k, v)
        steps = {"fwd": lambda: fn(q, k, v), "fwdbwd": lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do),
                 "bwd": lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)}
        results[pname] = {p: harness.time_ms(s, device, reps=20) for p, s in steps.items()}
        out = None
        for phase, t in results[pname].items():
            yield harness.row(ROPE_KERNEL, pname, shape, dtype, f"ms_{phase}", t, meta)
        torch.cuda.empty_cache()
    for pname, times in results.items():
        if pname == "vjepa2_path":
            continue
        for phase, suffix in (("fwdbwd", ""), ("fwd", "_fwd"), ("bwd", "_bwd")):
            yield harness.row(ROPE_KERNEL, pname, shape, dtype, f"speedup_vs_vjepa2{suffix}",
                              tuple(results["vjepa2_path"][phase][0] / t for t in times[phase]), meta)


def run_rope(device, dtype, meta):
    """Rows of every rotary shape: timed on a GPU, correctness only on the CPU."""
    cuda = torch.device(device).type == "cuda"
    for name, B, H, D, grid, action_tokens in (CUDA_ROPE_SHAPES if cuda else CPU_ROPE_SHAPES):
        provs, N = rope_providers(device, grid, action_tokens, D)
        shape = f"{name}:B{B}xH{H}xN{N}xD{D}" + (f"xframe{action_tokens + grid[1] * grid[2]}" if action_tokens else "")
        if cuda:
            yield from _timed_rows(provs, shape, B, H, N, D, dtype, device, meta)
        else:
            yield from _correctness_rows(provs, shape, B, H, N, D, device, meta)
