"""Attention benchmark: iwm-fast's Triton kernel vs every SDPA backend, flash-attn and xformers.

Metrics per (shape, provider): ``tflops_fwd``, ``tflops_bwd``, ``tflops_fwdbwd`` (FLOPs counted as in
flash-attention's benchmark: 4·B·H·Nq·Nk·D forward, 2.5x that backward), ``peak_mem_mb`` (extra CUDA
memory of one forward+backward over the inputs), and for non-SDPA providers ``speedup_vs_best_sdpa``
(fwd+bwd; ``_fwd`` and ``_bwd`` variants too): the fastest SDPA backend's median time over the provider's,
both measured in this run. Providers that reject a shape (e.g. SDPA flash at some head dims) are skipped.

At head dims the kernel splits into two tiles (80 = 64 + 16, see kernels/attention.py), the kernel is also
timed with the split turned off (provider ``triton_padded_d``: one tile padded to the next power of two), and
``speedup_vs_padded_d`` rows give the split's gain measured in the same run.
"""
import contextlib
import importlib.util
import os

import torch
import torch.nn.functional as F

from . import harness
from ..ops.attention import attention

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
    del out
    mem = _peak_mem_mb(fwdbwd, device) if torch.device(device).type == "cuda" else None
    return (times, mem), None


def _speedup(best_ms, stats_ms):
    # Like harness.rate, the p20/p80 columns follow the provider's p20/p80 times.
    return tuple(best_ms / t for t in stats_ms)


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
    return list(rows)


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
