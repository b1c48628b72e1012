"""Attention benchmark: iwm-fast's Triton kernel vs every SDPA backend, flash-attn and xformers.

Metrics per (shape, provider): ``tflops_fwd``, ``tflops_bwd``, ``tflops_fwdbwd`` (FLOPs counted as in
flash-attention's benchmark: 4·B·H·Nq·Nk·D forward, 2.5x that backward), ``peak_mem_mb`` (extra CUDA
memory of one forward+backward over the inputs), and for non-SDPA providers ``speedup_vs_best_sdpa``
(fwd+bwd; ``_fwd`` and ``_bwd`` variants too): the fastest SDPA backend's median time over the provider's,
both measured in this run. Providers that reject a shape (e.g. SDPA flash at some head dims) are skipped.

At head dims the kernel splits into two tiles (80 = 64 + 16, see kernels/attention.py), the kernel is also
timed with the split turned off (provider ``triton_padded_d``: one tile padded to the next power of two), and
``speedup_vs_padded_d`` rows give the split's gain measured in the same run.

Rotary rows (V-JEPA 2's shapes, kernel ``rope_attention``): ``triton`` is ``ops.rope_attention`` (one fused
rotary pass over q and k, then our kernel; block-causal for V-JEPA 2-AC's predictor), ``triton_rope+sdpa`` our
rotary pass followed by SDPA (isolates the rotation), ``vjepa2_path`` the rotation as V-JEPA 2 does it in PyTorch
(sines and cosines built on every call, per-axis slices, concatenations) followed by SDPA with its dense
boolean mask for the AC predictor. Metrics: ``ms_fwd``/``ms_bwd``/``ms_fwdbwd`` and ``speedup_vs_vjepa2``
(``_fwd``, ``_bwd``), all measured in this run. On the CPU these rows only check correctness
(``max_rel_err_vs_vjepa2``: our output against the V-JEPA 2-style path).
"""
import contextlib
import importlib.util
import os

import torch
import torch.nn.functional as F

from . import harness
from ..ops.attention import attention, block_causal_mask
from ..ops.rope import apply_rope, grid_positions, rope_attention, vjepa2_axes

KERNEL = "attention"
ROWS_SO_FAR = []  # rows of the shapes finished so far: what a runner stopped at its time limit keeps
PADDED = "triton_padded_d"

# (name, B, H, N, D). Batch sizes give B*H in the thousands so the short sequences still fill an H100.
CUDA_SHAPES = [
    ("vit_b16_224", 256, 12, 196, 64),
    ("vit_h14_224", 128, 16, 256, 80),
    ("ijepa_pred_vitb_d32", 512, 12, 150, 32),   # width 384, 12 heads; context + one target block
    ("ijepa_pred_vith_d24", 512, 16, 220, 24),   # width 384, 16 heads
    ("n1024_d64", 32, 16, 1024, 64),
    ("n1568_d64", 16, 16, 1568, 64),             # V-JEPA-sized (16x224x224 clip, tubelet 2, patch 16)
]
# Both targets (N <= 256 and N 1024) at one head dim first, then ViT-H's D = 80 with and without the split.
CUDA_QUICK = ("vit_b16_224", "n1024_d64", "vit_h14_224")
CPU_SHAPES = [("tiny_d24", 1, 2, 33, 24), ("tiny_d64", 1, 1, 17, 64)]

ROPE_KERNEL = "rope_attention"
# (name, B, H, D, (T, H, W) token grid, action tokens per frame). 16 frames at 256 px, tubelet 2, patch 16:
# an 8 x 16 x 16 grid, N = 2048. The AC predictor adds 2 action tokens per frame (N = 2064) and is frame-causal.
CUDA_ROPE_SHAPES = [
    ("vjepa2_vitl_16f256", 4, 16, 64, (8, 16, 16), 0),    # ViT-L encoder: 16 heads of 64
    ("vjepa2_vitg_16f256", 4, 16, 88, (8, 16, 16), 0),    # ViT-g encoder: 16 heads of 88
    ("vjepa2_pred_16f256", 4, 12, 32, (8, 16, 16), 0),    # predictor, 384 wide: 12 heads of 32
    ("vjepa2ac_pred_8x256", 2, 16, 64, (8, 16, 16), 2),   # V-JEPA 2-AC predictor, 1024 wide, frame-causal
]
CUDA_ROPE_QUICK = ("vjepa2_vitl_16f256", "vjepa2ac_pred_8x256")
CPU_ROPE_SHAPES = [("tiny_rope_d40", 1, 2, 40, (2, 3, 4), 0), ("tiny_ac_d24", 1, 2, 24, (2, 3, 3), 2)]


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = [("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
             ("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_math", "MATH")]
    return [(label, getattr(SDPBackend, attr)) for label, attr in names if hasattr(SDPBackend, attr)]


def _sdpa_provider(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


def providers(device):
    """{name: fn(q, k, v) -> out} for everything that can run on ``device``."""
    found = {}
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device == "cuda" or interp:
        found["triton"] = lambda q, k, v: attention(q, k, v, backend="triton")
    if device == "cuda":
        for label, backend in _sdpa_backends():
            found[label] = _sdpa_provider(backend)
        if importlib.util.find_spec("flash_attn") is not None:
            found["flash_attn"] = lambda q, k, v: attention(q, k, v, backend="flash_attn")
        if importlib.util.find_spec("xformers") is not None:
            found["xformers"] = lambda q, k, v: attention(q, k, v, backend="xformers")
    else:
        found["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend
        found["sdpa_math"] = _sdpa_provider(SDPBackend.MATH)
    return found


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _variants(provs, D):
    """(label, fn, env) to time at head dim D: every provider, plus the Triton kernel without the head-dim
    split where it splits D (the environment switch is read at each launch, the backward's included)."""
    from ..kernels.attention import head_dim_tiles

    out = [(name, fn, None) for name, fn in provs.items()]
    if "triton" in provs and head_dim_tiles(D, split=True)[2]:
        out.append((PADDED, provs["triton"], ("IWM_FAST_ATTN_SPLIT_HEAD_DIM", "0")))
    return out


def _inputs(B, H, N, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype) for _ in range(4))
    return [t.requires_grad_(True) for t in (q, k, v)], do


def _peak_mem_mb(step, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _measure(fn, B, H, N, D, dtype, device, quick):
    """Times (median, p20, p80) in ms of fwd, bwd and fwd+bwd, and peak memory; None if fn rejects the shape."""
    (q, k, v), do = _inputs(B, H, N, D, dtype, device)
    try:
        out = fn(q, k, v)  # first call also compiles and autotunes the Triton kernels
        torch.autograd.grad(out, (q, k, v), do)
    except Exception as e:  # a provider that rejects the shape (or fails to compile for it) is skipped
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    reps = 20 if quick else 50

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwdbwd():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    out = fn(q, k, v)
    bwd = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
    times = {name: harness.time_ms(f, device, reps=reps) for name, f in
             (("fwd", fwd), ("bwd", bwd), ("fwdbwd", fwdbwd))}
    out = None  # frees the graph before the next provider
    mem = _peak_mem_mb(fwdbwd, device) if torch.device(device).type == "cuda" else None
    return (times, mem), None


def _speedup(best_ms, stats_ms):
    # Like harness.rate, the p20/p80 columns follow the provider's p20/p80 times.
    return tuple(best_ms / t for t in stats_ms)


# ---- rotary rows ---------------------------------------------------------------------------------------

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


def run_rope(device, quick, dtype, meta, rows):
    dev_type = torch.device(device).type
    if dev_type == "cuda":
        by_name = {s[0]: s for s in CUDA_ROPE_SHAPES}
        shapes = [by_name[n] for n in CUDA_ROPE_QUICK] if quick else CUDA_ROPE_SHAPES
    else:
        shapes = CPU_ROPE_SHAPES[-1:] if quick else CPU_ROPE_SHAPES
    for name, B, H, D, grid, action_tokens in shapes:
        provs, N = rope_providers(device, grid, action_tokens, D)
        shape = f"{name}:B{B}xH{H}xN{N}xD{D}" + (f"xframe{action_tokens + grid[1] * grid[2]}" if action_tokens else "")
        if dev_type != "cuda":  # correctness only
            (q, k, v), _ = _inputs(B, H, N, D, torch.float32, device)
            want = provs["vjepa2_path"](q, k, v)
            for pname, fn in provs.items():
                if pname != "vjepa2_path":
                    err = ((fn(q, k, v) - want).abs().max() / want.abs().max()).item()
                    rows.append(harness.row(ROPE_KERNEL, pname, shape, torch.float32, "max_rel_err_vs_vjepa2",
                                            (err, err, err), meta))
            continue
        results = {}
        for pname, fn in provs.items():
            res, why = _measure(fn, B, H, N, D, dtype, device, quick)
            if res is None:
                print(f"  skip {pname} at {shape}: {why}")
                continue
            results[pname] = res[0]
            for phase in ("fwd", "bwd", "fwdbwd"):
                rows.append(harness.row(ROPE_KERNEL, pname, shape, dtype, f"ms_{phase}", res[0][phase], meta))
            torch.cuda.empty_cache()
        if "vjepa2_path" in results:
            for pname, times in results.items():
                if pname == "vjepa2_path":
                    continue
                for phase, suffix in (("fwdbwd", ""), ("fwd", "_fwd"), ("bwd", "_bwd")):
                    rows.append(harness.row(ROPE_KERNEL, pname, shape, dtype, f"speedup_vs_vjepa2{suffix}",
                                            _speedup(results["vjepa2_path"][phase][0], times[phase]), meta))


def run(device: str, quick: bool) -> list:
    dev_type = torch.device(device).type
    if dev_type == "cuda":
        by_name = {s[0]: s for s in CUDA_SHAPES}
        shapes = [by_name[n] for n in CUDA_QUICK] if quick else CUDA_SHAPES
        dtype = torch.bfloat16
    else:
        shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
        dtype = torch.float32
    meta = harness.metadata(device)
    provs = providers(dev_type)
    ROWS_SO_FAR.clear()
    rows = ROWS_SO_FAR
    for name, B, H, N, D in shapes:
        shape = f"{name}:B{B}xH{H}xN{N}xD{D}"
        fwd_flops = 4 * B * H * N * N * D
        flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwdbwd": 3.5 * fwd_flops}
        results = {}
        for pname, fn, env in _variants(provs, D):
            with _env(*env) if env else contextlib.nullcontext():
                res, why = _measure(fn, B, H, N, D, dtype, device, quick)
            if res is None:
                print(f"  skip {pname} at {shape}: {why}")
                continue
            results[pname] = res
            times, mem = res
            for phase in ("fwd", "bwd", "fwdbwd"):
                rows.append(harness.row(KERNEL, pname, shape, dtype, f"tflops_{phase}",
                                        harness.rate(flops[phase], times[phase], 1e12), meta))
            if mem is not None:
                rows.append(harness.row(KERNEL, pname, shape, dtype, "peak_mem_mb", (mem, mem, mem), meta))
            if dev_type == "cuda":
                torch.cuda.empty_cache()
        if "triton" in results and PADDED in results:
            for phase, suffix in (("fwdbwd", ""), ("fwd", "_fwd"), ("bwd", "_bwd")):
                rows.append(harness.row(KERNEL, "triton", shape, dtype, f"speedup_vs_padded_d{suffix}",
                                        _speedup(results[PADDED][0][phase][0], results["triton"][0][phase]), meta))
        sdpa = {p: r for p, r in results.items() if p.startswith("sdpa")}
        if not sdpa:
            continue
        for pname, (times, _) in results.items():
            if pname.startswith("sdpa"):
                continue
            for phase, suffix in (("fwdbwd", ""), ("fwd", "_fwd"), ("bwd", "_bwd")):
                best = min(r[0][phase][0] for r in sdpa.values())
                rows.append(harness.row(KERNEL, pname, shape, dtype, f"speedup_vs_best_sdpa{suffix}",
                                        _speedup(best, times[phase]), meta))
    run_rope(device, quick, dtype, meta, rows)
    return list(rows)


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
