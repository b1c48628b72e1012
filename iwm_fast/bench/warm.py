"""Compile the attention kernels that the quick benchmark will launch, in parallel processes, before timing.

Triton compiles a kernel variant in the process that first launches it, about 2 s each on one core, and the
GPU check's attention rows need about 50 variants (each shape's pinned tiles, each A/B switch, every tile choice
the autotuned row may pick, the end-to-end step's sequence lengths): one after another they would take most of
the check's attention stage. A pool of processes fills Triton's on-disk cache instead, and the timing process
loads each variant from it. A task is one forward + backward at batch 1: a launch specializes on the head count,
sequence length, head dim, strides and switches, not on the batch, so it compiles what the full row will use.
"""
import concurrent.futures
import multiprocessing
import os
import time
from unittest import mock

from ..kernels.attention_tiles import KERNELS, SPACES, TILES_ENV, head_dim_tiles, space_width

# The end-to-end step's sequences (ViT-H/14 context and predictor, 16 heads): one length whose row strides are
# multiples of 16 and one whose are not, the two specializations a varying length takes.
E2E_SEQUENCES = [(16, 129, 80), (16, 144, 80), (16, 181, 24), (16, 192, 24)]


def _each_tile_choice(D):
    """Environments pinning, in turn, every tile choice of head dim D's spaces (what the autotuner compiles)."""
    block_d, block_d2, split = head_dim_tiles(D)
    width = space_width(block_d + (block_d2 if split else 0))
    spaces = [SPACES[kernel][width] for kernel in KERNELS]
    for i in range(max(map(len, spaces))):
        picks = [space[min(i, len(space) - 1)] for space in spaces]
        yield {TILES_ENV: ",".join(f"{k}={'x'.join(map(str, c))}" for k, c in zip(KERNELS, picks))}


def tasks(goal_dims, ab, autotuned, device_is_cuda):
    """[(H, N, D, env)]: the goal shapes pinned, each A/B variant, each tile choice of ``autotuned`` (a shape
    name), and (on a GPU) the end-to-end sequences pinned."""
    pinned = {TILES_ENV: "pinned"}
    out = [(H, N, D, pinned) for (_, H, N, D) in goal_dims.values()]
    if not device_is_cuda:  # the interpreter compiles nothing: the smoke run warms the goal shapes only
        return out
    for name, _, env, _ in ab:
        if name in goal_dims and env.get(TILES_ENV) != "autotune":
            _, H, N, D = goal_dims[name]
            out.append((H, N, D, {**pinned, **env}))
    if autotuned in goal_dims:
        _, H, N, D = goal_dims[autotuned]
        out += [(H, N, D, env) for env in _each_tile_choice(D)]
    return out + [(H, N, D, pinned) for H, N, D in E2E_SEQUENCES]


def _run_task(task):
    """One forward + backward of the attention op and of the packed op (in a worker); returns (seconds, error)."""
    H, N, D, env, device, dtype_name = task
    import torch

    from ..ops.attention import attention, attention_qkv, split_qkv

    t0 = time.perf_counter()
    try:
        with mock.patch.dict(os.environ, env):
            qkv = torch.randn(1, N, 3, H, D, device=device, dtype=getattr(torch, dtype_name), requires_grad=True)
            out = attention(*split_qkv(qkv), backend="triton")
            out.backward(torch.ones_like(out))
            attention_qkv(qkv, backend="triton").sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
    except Exception as exc:
        return time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return time.perf_counter() - t0, None


def compile_ahead(task_list, device, dtype_name, workers):
    """Run ``task_list`` in ``workers`` spawned processes; returns (wall seconds, [errors])."""
    t0 = time.perf_counter()
    jobs = [(*t, device, dtype_name) for t in task_list]
    context = multiprocessing.get_context("spawn")  # a forked child must not inherit a CUDA context
    with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=context) as pool:
        results = list(pool.map(_run_task, jobs))
    errors = [f"H{t[0]} N{t[1]} D{t[2]} {t[3]}: {err}" for t, (_, err) in zip(task_list, results) if err]
    return time.perf_counter() - t0, errors
