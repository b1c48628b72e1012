"""Attention-layer rows of the attention benchmark: the model's own layer (``iwm_fast.layers.Attention``: qkv
linear, attention on views of the packed projection, output projection), bf16 weights as training holds them,
forward + backward with respect to the input and the weights.

Providers: ``triton`` (the packed-qkv op: its backward writes the projection's gradient directly), ``sdpa``
(the same layer on SDPA, PyTorch's own backend choice) and each SDPA backend selected explicitly. Metrics:
``ms_fwdbwd`` and, for the kernel, ``speedup_vs_best_sdpa`` (the fastest SDPA row's median over the kernel's).
"""
import contextlib
import os
from unittest import mock

import torch

from ..kernels.attention_tiles import TILES_ENV
from ..layers import Attention
from . import harness

KERNEL = "attention_layer"


def _layer_providers(device):
    from .attention import _sdpa_backends

    found = {"triton": (None, "triton"), "sdpa": (None, "sdpa")}
    if torch.device(device).type == "cuda":
        found.update((label, (backend, "sdpa")) for label, backend in _sdpa_backends())
    return found


def _time_layer(layer, x, sdpa_backend, device):
    from torch.nn.attention import sdpa_kernel

    params = [x, *layer.parameters()]

    def step():
        with sdpa_kernel(sdpa_backend) if sdpa_backend is not None else contextlib.nullcontext():
            y = layer(x)
        torch.autograd.grad(y, params, torch.ones_like(y))

    step()  # compiles (the kernel) before timing
    return harness.time_ms(step, device, reps=20, cpu_reps=2)


def layer_rows(named_dims, device, dtype, meta):
    """Rows for each (name, (B, H, N, D)): the layer at width H * D with H heads on [B, N, H * D] tokens."""
    for name, (B, H, N, D) in named_dims:
        shape = f"{name}:B{B}xN{N}xC{H * D}xH{H}"
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(B, N, H * D, generator=g, device=device, dtype=dtype).requires_grad_(True)
        times = {}
        for pname, (sdpa_backend, backend) in _layer_providers(device).items():
            torch.manual_seed(0)
            layer = Attention(H * D, num_heads=H, backend=backend).to(device=device, dtype=dtype)
            try:
                with mock.patch.dict(os.environ, {TILES_ENV: "pinned"}):
                    times[pname] = _time_layer(layer, x, sdpa_backend, device)
            except Exception as exc:  # an SDPA backend may refuse the shape; the kernel may not
                if pname == "triton":
                    raise
                from .attention import NOTES

                NOTES.append(f"{KERNEL} {shape}: {pname} left out: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            yield harness.row(KERNEL, pname, shape, dtype, "ms_fwdbwd", times[pname], meta)
        sdpa = [t for p, t in times.items() if p.startswith("sdpa")]
        if "triton" in times and sdpa:
            best = min(t[0] for t in sdpa)
            yield harness.row(KERNEL, "triton", shape, dtype, "speedup_vs_best_sdpa",
                              tuple(best / t for t in times["triton"]), meta)
