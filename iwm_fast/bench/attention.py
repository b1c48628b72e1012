"""Attention benchmark: iwm-fast's Triton kernel vs every SDPA backend (each selected explicitly), at the shapes
of IWM/I-JEPA training, fed as the model feeds them.

Shapes (``GOALS``): the encoders' sequences (ViT-B/16: 196 and 197 tokens, D = 64; ViT-H/14: 256 tokens, D = 80)
and the predictor's (context + one target block: about 150 tokens at D = 32 for ViT-B, 220 at D = 24 for ViT-H),
at batch 128 (the predictor's 4 targets make 512 sequences), bf16. q, k and v are views of one packed
projection [B, N, 3, H, D] and the output gradient a [B, N, H, D] view, as the attention layer produces them.

Rows per (shape, provider): ``tflops_fwd``, ``tflops_bwd``, ``tflops_fwdbwd`` (4·B·H·N²·D forward, 2.5x that
backward, as flash-attention's benchmark counts), ``peak_mem_mb``; for the Triton kernel
``speedup_vs_best_sdpa`` (``_fwd``, ``_bwd``): the fastest SDPA backend's median time over the kernel's, both
from this run, and a ``best_sdpa_ms_fwdbwd`` row naming that backend. An SDPA backend that rejects a shape is
left out with a note. The quick set runs the kernel on its pinned tiles (no autotuning) and adds:

- ``attention_layer`` rows: the model's Attention layer (qkv linear, attention, projection; bf16 weights), fwd +
  bwd, Triton (its packed-qkv op) against the layer on SDPA;
- A/B rows (``AB``), each the kernel with one switch changed, as ``speedup_vs_pinned``: what only a GPU can
  decide (8 against 4 warps at D = 80; 32-row against 64-row tiles; the padded D = 80 tile against the split;
  the full tail tile against the 16-row one; the autotuner's pick against the pinned tiles).

Rotary rows (V-JEPA 2's shapes, N = 2048; full run only): ``rope_attention`` against the rotation as V-JEPA 2
writes it in PyTorch followed by SDPA (``speedup_vs_vjepa2``); on the CPU they check correctness only.
"""
import importlib.util
import os
from unittest import mock

import torch
import torch.nn.functional as F

from ..kernels.attention_tiles import SPLIT_ENV, TAIL_ENV, TILES_ENV
from ..ops.attention import attention, split_qkv
from . import harness
from .rope_rows import run_rope

KERNEL = "attention"
NOTES = []

# (name, (B, H, N, D) on a GPU, (B, H, N, D) for the CPU smoke run under the interpreter).
GOALS = [
    ("vit_b16_196", (128, 12, 196, 64), (1, 2, 37, 64)),
    ("vit_b16_197", (128, 12, 197, 64), (1, 1, 21, 64)),
    ("vit_h14_256", (128, 16, 256, 80), (1, 1, 24, 80)),
    ("pred_vitb_150", (512, 12, 150, 32), (2, 1, 19, 32)),
    ("pred_vith_220", (512, 16, 220, 24), (1, 2, 33, 24)),
]
LONG = [("n1024_d64", (32, 16, 1024, 64), None), ("n1568_d64", (16, 16, 1568, 64), None)]  # full run only
LAYER_SHAPES = ("vit_h14_256", "vit_b16_196")
_ROWS32 = "fwd=32x32x4x3,dq=32x32x4x3,dkdv=32x32x4x3"  # the <= 64 space's pinned tiles with 32 rows
# (shape, label, environment, what it decides); each against the pinned tiles of the same shape.
AB = [
    ("vit_h14_256", "warps8", {TILES_ENV: "fwd=64x32x8x2,dq=64x32x8x2,dkdv=64x32x8x2"}, "8 vs 4 warps, D=80"),
    ("vit_h14_256", "padded_d", {SPLIT_ENV: "0"}, "D=80 padded to 128 vs 64+16"),
    ("vit_h14_256", "autotuned", {TILES_ENV: "autotune"}, "autotuner's pick vs pinned"),
    ("vit_b16_196", "rows32", {TILES_ENV: _ROWS32}, "32-row (mma.sync) vs 64-row (wgmma) tiles"),
    ("pred_vitb_150", "rows32", {TILES_ENV: _ROWS32}, "32-row vs 64-row tiles"),
    ("pred_vith_220", "rows32", {TILES_ENV: _ROWS32}, "32-row vs 64-row tiles"),
    ("vit_b16_196", "full_tail", {TAIL_ENV: "0"}, "full vs 16-row tail tile"),
    ("vit_b16_197", "full_tail", {TAIL_ENV: "0"}, "full vs 16-row tail tile"),
    ("pred_vith_220", "full_tail", {TAIL_ENV: "0"}, "full vs 16-row tail tile"),
]
PINNED = {TILES_ENV: "pinned"}


def shapes(device, quick):
    """[(name, B, H, N, D)] to run."""
    if torch.device(device).type != "cuda":
        return [(name, *cpu) for name, _, cpu in GOALS]
    return [(name, *gpu) for name, gpu, _ in (GOALS if quick else GOALS + LONG)]


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = [("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_flash", "FLASH_ATTENTION"),
             ("sdpa_efficient", "EFFICIENT_ATTENTION")]
    return [(label, getattr(SDPBackend, attr)) for label, attr in names if hasattr(SDPBackend, attr)]


def _sdpa_provider(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


def providers(device):
    """{name: fn(q, k, v) -> out}: the kernel and each SDPA backend that can run on ``device``."""
    found = {}
    if torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        found["triton"] = lambda q, k, v: attention(q, k, v, backend="triton")
    if torch.device(device).type == "cuda":
        found.update((label, _sdpa_provider(b)) for label, b in _sdpa_backends())
        for package in ("flash_attn", "xformers"):
            if importlib.util.find_spec(package) is not None:
                found[package] = lambda q, k, v, p=package: attention(q, k, v, backend=p)
    else:
        from torch.nn.attention import SDPBackend

        found["sdpa_math"] = _sdpa_provider(SDPBackend.MATH)  # the CPU's stand-in: runs the same rows
    return found


def model_inputs(B, H, N, D, dtype, device, seed=0):
    """(qkv leaf [B, N, 3, H, D], (q, k, v) views of it, do [B, H, N, D] viewing [B, N, H, D] memory)."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g, device=device, dtype=dtype).requires_grad_(True)
    do = torch.randn(B, N, H, D, generator=g, device=device, dtype=dtype).transpose(1, 2)
    return qkv, split_qkv(qkv), do


def _peak_mem_mb(step, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def measure(fn, B, H, N, D, dtype, device, phases=("fwd", "bwd", "fwdbwd"), reps=20):
    """{phase: (median, p20, p80) ms} of fn on the model's views (grads of q, k, v), and peak memory (MB)."""
    _, (q, k, v), do = model_inputs(B, H, N, D, dtype, device)
    torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # compiles (and autotunes) before timing

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwdbwd():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    out = fn(q, k, v)
    steps = {"fwd": fwd, "fwdbwd": fwdbwd,
             "bwd": lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)}
    times = {p: harness.time_ms(steps[p], device, reps=reps, cpu_reps=2) for p in phases}
    out = None  # frees the graph before the next provider
    mem = _peak_mem_mb(fwdbwd, device) if torch.device(device).type == "cuda" else None
    return times, mem


def _speedups(best, times, meta, shape, dtype, provider, prefix):
    for phase, suffix in (("fwdbwd", ""), ("fwd", "_fwd"), ("bwd", "_bwd")):
        if phase in best and phase in times:
            yield harness.row(KERNEL, provider, shape, dtype, f"{prefix}{suffix}",
                              tuple(best[phase][0] / t for t in times[phase]), meta)


def _shape_rows(name, dims, provs, device, dtype, meta, quick):
    """Rows of one shape: every provider's rates, the kernel against the best SDPA backend. Returns
    (rows, the kernel's times) so the A/B rows can compare against it."""
    B, H, N, D = dims
    shape = f"{name}:B{B}xH{H}xN{N}xD{D}"
    flops = 4 * B * H * N * N * D
    work = {"fwd": flops, "bwd": 2.5 * flops, "fwdbwd": 3.5 * flops}
    rows, results = [], {}
    for pname, fn in provs.items():
        env = PINNED if quick and pname == "triton" else {}
        try:
            with mock.patch.dict(os.environ, env):
                times, mem = measure(fn, B, H, N, D, dtype, device)
        except Exception as exc:  # an SDPA backend may refuse a shape; the kernel may not
            if pname == "triton":
                raise
            NOTES.append(f"attention {shape}: {pname} left out: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        results[pname] = times
        rows += [harness.row(KERNEL, pname, shape, dtype, f"tflops_{p}", harness.rate(work[p], t, 1e12), meta)
                 for p, t in times.items()]
        if mem is not None:
            rows.append(harness.row(KERNEL, pname, shape, dtype, "peak_mem_mb", (mem,) * 3, meta))
    sdpa = {p: t for p, t in results.items() if p.startswith("sdpa")}
    if sdpa and "triton" in results:
        best = min(sdpa, key=lambda p: sdpa[p]["fwdbwd"][0])
        rows.append(harness.row(KERNEL, best, shape, dtype, "best_sdpa_ms_fwdbwd", sdpa[best]["fwdbwd"], meta))
        best_times = {ph: min((t[ph] for t in sdpa.values()), key=lambda s: s[0]) for ph in results["triton"]}
        rows += _speedups(best_times, results["triton"], meta, shape, dtype, "triton", "speedup_vs_best_sdpa")
    return rows, results.get("triton"), shape


def ab_rows(dims_by_name, pinned_times, device, dtype, meta):
    """The A/B rows: the kernel with one switch changed, fwd + bwd, against its pinned tiles at the same shape."""
    fn = providers(device)["triton"]
    for name, label, env, _ in AB:
        if name not in pinned_times:
            continue
        shape, base = pinned_times[name]
        with mock.patch.dict(os.environ, {**PINNED, **env}):
            times, _ = measure(fn, *dims_by_name[name], dtype, device, phases=("fwdbwd",))
        provider = f"triton[{label}]"
        yield harness.row(KERNEL, provider, shape, dtype, "ms_fwdbwd", times["fwdbwd"], meta)
        yield harness.row(KERNEL, provider, shape, dtype, "speedup_vs_pinned",
                          tuple(base["fwdbwd"][0] / t for t in times["fwdbwd"]), meta)


def _compile_ahead(device, dtype, quick):
    """Compile the quick set's kernel variants in a pool of processes first (iwm_fast.bench.warm)."""
    from . import warm

    goal_dims = {name: dims for name, *dims in shapes(device, quick)}
    cuda = torch.device(device).type == "cuda"
    task_list = warm.tasks(goal_dims, AB, "vit_h14_256", cuda)
    workers = min(12, max(1, (os.cpu_count() or 2) - 2)) if cuda else 1
    seconds, errors = warm.compile_ahead(task_list, torch.device(device).type, str(dtype).split(".")[1], workers)
    NOTES.append(f"attention: {len(task_list)} kernel variants compiled ahead in {seconds:.0f} s by {workers} "
                 f"processes")
    if errors:  # the timing below compiles (and fails on) them again, with the traceback
        NOTES.extend(f"attention: compile-ahead failed: {e}" for e in errors)


def run(device: str, quick: bool):
    dev_type = torch.device(device).type
    dtype = torch.bfloat16 if dev_type == "cuda" else torch.float32  # the interpreter's bf16 dots are wrong
    meta = harness.metadata(device)
    NOTES.clear()
    provs = providers(device)
    if quick and "triton" in provs:
        _compile_ahead(device, dtype, quick)
    dims_by_name, pinned_times = {}, {}
    for name, *dims in shapes(device, quick):
        rows, triton_times, shape = _shape_rows(name, dims, provs, device, dtype, meta, quick)
        yield from rows
        dims_by_name[name] = dims
        if triton_times is not None:
            pinned_times[name] = (shape, triton_times)
        if dev_type == "cuda":
            torch.cuda.empty_cache()
    if quick and "triton" in provs:
        from .attention_layer import layer_rows

        yield from layer_rows([(n, dims_by_name[n]) for n in LAYER_SHAPES], device, dtype, meta)
        yield from ab_rows(dims_by_name, pinned_times, device, dtype, meta)
    if not quick:
        yield from run_rope(device, dtype, meta)


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
