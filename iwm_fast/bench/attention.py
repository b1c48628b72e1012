"""Attention benchmark: iwm-fast's Triton kernel vs every SDPA backend, flash-attn and xformers.

Metrics per (shape, provider): ``tflops_fwd``, ``tflops_bwd``, ``tflops_fwdbwd`` (FLOPs counted as in
flash-attention's benchmark: 4·B·H·Nq·Nk·D forward, 2.5x that backward), ``peak_mem_mb`` (extra CUDA
memory of one forward+backward over the inputs), and for non-SDPA providers ``speedup_vs_best_sdpa``
(fwd+bwd; ``_fwd`` and ``_bwd`` variants too): the fastest SDPA backend's median time over the provider's,
both measured in this run. Providers that reject a shape (e.g. SDPA flash at some head dims) are skipped.
"""
import importlib.util
import os

import torch
import torch.nn.functional as F

from . import harness
from ..ops.attention import attention

KERNEL = "attention"

# (name, B, H, N, D). Batch sizes give B*H in the thousands so the short sequences still fill an H100.
CUDA_SHAPES = [
    ("vit_b16_224", 256, 12, 196, 64),
    ("vit_h14_224", 128, 16, 256, 80),
    ("ijepa_pred_vitb_d32", 512, 12, 150, 32),   # width 384, 12 heads; context + one target block
    ("ijepa_pred_vith_d24", 512, 16, 220, 24),   # width 384, 16 heads
    ("n1024_d64", 32, 16, 1024, 64),
    ("n1568_d64", 16, 16, 1568, 64),             # V-JEPA-sized (16x224x224 clip, tubelet 2, patch 16)
]
# One head dim (one set of kernel compilations + autotuning) covering both targets: N <= 256 and N 1024.
CUDA_QUICK = ("vit_b16_224", "n1024_d64")
CPU_SHAPES = [("tiny_d24", 1, 2, 33, 24), ("tiny_d64", 1, 1, 17, 64)]


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
    del out
    mem = _peak_mem_mb(fwdbwd, device) if torch.device(device).type == "cuda" else None
    return (times, mem), None


def _speedup(best_ms, stats_ms):
    # Like harness.rate, the p20/p80 columns follow the provider's p20/p80 times.
    return tuple(best_ms / t for t in stats_ms)


def run(device: str, quick: bool) -> list:
    dev_type = torch.device(device).type
    if dev_type == "cuda":
        shapes = [s for s in CUDA_SHAPES if not quick or s[0] in CUDA_QUICK]
        dtype = torch.bfloat16
    else:
        shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
        dtype = torch.float32
    meta = harness.metadata(device)
    provs = providers(dev_type)
    rows = []
    for name, B, H, N, D in shapes:
        shape = f"{name}:B{B}xH{H}xN{N}xD{D}"
        fwd_flops = 4 * B * H * N * N * D
        flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwdbwd": 3.5 * fwd_flops}
        results = {}
        for pname, fn in provs.items():
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
    return rows


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
