"""Rotary embeddings (iwm_fast.ops.rope, kernels/rope.py) and rotary attention against float64 references.

The reference spells out the rotation in float64 from its definition (each axis's frequencies, V-JEPA 2's
half-frequencies repeated across the vector or the interleaved layout, the unrotated remainder); its gradients
come from autograd, independent of the kernel's transposed rotation. Tolerance as in test_attention.py: at most
twice the error of the same computation in PyTorch in the input dtype (angles in float32), plus a small epsilon.
Set VJEPA2_SRC to a checkout of facebookresearch/vjepa2 to also compare with its own rotate_queries_or_keys.
"""
import os
import sys

import pytest
import torch

from iwm_fast.ops import apply_rope, grid_positions, rope_attention, vjepa2_axes

F16, F32 = torch.float16, torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels: on the GPU, or interpreted on the CPU


def _freqs(axis_dim, layout, base, dtype):
    half = axis_dim // 2
    omega = base ** (-torch.arange(half, dtype=torch.float64, device=DEV) / half)
    per_channel = torch.cat([omega, omega]) if layout == "vjepa2" else omega.repeat_interleave(2)
    return per_channel.to(dtype)


def _reference_rope(x, pos, axes, layout, base=10000.0, angle_dtype=torch.float64):
    """x [B, H, N, D] rotated per axis; pos [B or 1, N, A]. Angles in angle_dtype, the rest in x's dtype."""
    parts, start = [], 0
    for a, d in enumerate(axes):
        xs = x[..., start:start + d]
        theta = pos[:, None, :, a:a + 1].to(angle_dtype) * _freqs(d, layout, base, angle_dtype)
        pairs = xs.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)  # (x0, x1) -> (-x1, x0)
        parts.append(xs * theta.cos().to(x.dtype) + turned * theta.sin().to(x.dtype))
        start += d
    parts.append(x[..., start:])
    return torch.cat(parts, -1)


def _reference_attention(q, k, v, pos, axes, layout, angle_dtype):
    q, k = (_reference_rope(t, pos, axes, layout, angle_dtype=angle_dtype) for t in (q, k))
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1) @ v


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _positions(B, N, grid, seed):
    """[B, N, len(grid)] grid positions of a random sorted subset of N tokens per sample (a JEPA context)."""
    g = torch.Generator().manual_seed(seed)
    total = torch.tensor(grid).prod().item()
    ids = torch.stack([torch.randperm(total, generator=g)[:N].sort().values for _ in range(B)])
    return grid_positions(ids, grid).to(DEV)


def _check(got, lowp, want, name, D):
    eps = 8 * torch.finfo(torch.float32).eps * D ** 0.5 * max(1.0, want.abs().max().item())
    err, pt_err = _err(got, want), _err(lowp, want)
    assert torch.isfinite(got).all(), name
    assert err <= 2 * pt_err + eps, f"{name}: max error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + {eps:.3g}"


BF16_ON_GPU = pytest.mark.cuda  # the interpreter's bf16 dots are wrong; bf16 runs on a GPU


@pytest.mark.parametrize("D,layout,dtype", [(64, "vjepa2", F32), (80, "vjepa2", F16), (88, "interleaved", F32),
                                            (88, "vjepa2", F16), (39, "vjepa2", F32), (64, "interleaved", F16),
                                            pytest.param(88, "vjepa2", torch.bfloat16, marks=BF16_ON_GPU),
                                            pytest.param(64, "interleaved", torch.bfloat16, marks=BF16_ON_GPU)])
def test_rope_attention_matches_float64(D, layout, dtype):
    B, H, N, grid = 2, 2, 37, (3, 4, 5)
    axes = vjepa2_axes(D)
    g = torch.Generator().manual_seed(D)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g).to(DEV, dtype) for _ in range(4))
    pos = _positions(B, N, grid, seed=D)
    leaves = [_leaf(t) for t in (q, k, v)]
    out = rope_attention(*leaves, pos, axes=axes, layout=layout, backend="triton")
    out.backward(do)
    ref_in = [_leaf(t.double()) for t in (q, k, v)]
    ref = _reference_attention(*ref_in, pos.double(), axes, layout, torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    pt_in = [_leaf(t) for t in (q, k, v)]
    pt = _reference_attention(*pt_in, pos, axes, layout, torch.float32)
    pt_grads = torch.autograd.grad(pt, pt_in, do)
    _check(out, pt, ref, "out", D)
    for name, leaf, lowp, want in zip(("dq", "dk", "dv"), leaves, pt_grads, ref_grads):
        _check(leaf.grad, lowp, want, name, D)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("axes,grid,layout", [((24,), (29,), "vjepa2"), ((12, 8), (5, 6), "interleaved"),
                                              ((10, 10, 10), (2, 3, 5), "vjepa2")])
def test_apply_rope_1d_2d_3d_and_its_gradient(backend, axes, grid, layout):
    B, H, N, D = 2, 3, 23, 33  # odd head dim: the last channel has no partner
    g = torch.Generator().manual_seed(len(axes))
    x, dy = torch.randn(B, H, N, D, generator=g).to(DEV), torch.randn(B, H, N, D, generator=g).to(DEV)
    pos = _positions(B, N, grid, seed=1)
    xl = _leaf(x)
    y = apply_rope(xl, pos, axes=axes, layout=layout, base=100.0, backend=backend)
    y.backward(dy)
    x64 = _leaf(x.double())
    ref = _reference_rope(x64, pos.double(), axes, layout, base=100.0)
    (ref_grad,) = torch.autograd.grad(ref, x64, dy.double())
    assert _err(y, ref) < 1e-5 and _err(xl.grad, ref_grad) < 1e-5
    assert torch.equal(y[..., sum(axes):], x[..., sum(axes):])  # the remainder is left exactly as it was


def test_masked_subset_rotates_by_its_grid_positions():
    # Rotating the whole 2x3x4 clip and keeping a subset equals rotating the subset at its own positions.
    B, H, D, grid = 2, 2, 40, (2, 3, 4)
    x = torch.randn(B, H, 24, D, device=DEV)
    ids = torch.tensor([[0, 5, 6, 13, 23], [2, 3, 11, 12, 20]], device=DEV)
    axes = vjepa2_axes(D)
    full = apply_rope(x, grid_positions(torch.arange(24, device=DEV), grid), axes=axes, backend="triton")
    sub = torch.stack([x[b, :, ids[b]] for b in range(B)])
    got = apply_rope(sub, grid_positions(ids, grid), axes=axes, backend="triton")
    want = torch.stack([full[b, :, ids[b]] for b in range(B)])
    assert _err(got, want) < 1e-6


def test_grid_positions_and_vjepa2_axes():
    assert vjepa2_axes(64) == (20, 20, 20) and vjepa2_axes(80) == (26, 26, 26) and vjepa2_axes(88) == (28, 28, 28)
    assert grid_positions(torch.tensor([0, 7, 23]), (2, 3, 4)).tolist() == [[0, 0, 0], [0, 1, 3], [1, 2, 3]]
    assert grid_positions(torch.tensor([5]), (9,)).tolist() == [[5.0]]


def test_opcheck_rope_op():
    from iwm_fast.ops.rope import rope_op, rope_qk_op, rope_tables

    axis, inv_freq = rope_tables(20, (6, 6, 6), "vjepa2", device=DEV)
    x, y = _leaf(torch.randn(1, 2, 9, 20, device=DEV)), _leaf(torch.randn(1, 2, 9, 20, device=DEV))
    pos = _positions(1, 9, (2, 3, 3), seed=3)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for transpose in (False, True):
        torch.library.opcheck(rope_op, (x, pos, axis, inv_freq, transpose), test_utils=utils)
        torch.library.opcheck(rope_qk_op, (x, y, pos, axis, inv_freq, transpose), test_utils=utils)


class _CountingLauncher:
    """Stands in for a Triton kernel object: counts ``kernel[grid](...)`` launches and runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_q_and_k_turn_in_one_launch_forward_and_backward(monkeypatch):
    from iwm_fast.kernels import rope as kernel_module

    counter = _CountingLauncher(kernel_module._rope_kernel)
    monkeypatch.setattr(kernel_module, "_rope_kernel", counter)
    q, k, v = (_leaf(torch.randn(1, 2, 11, 24, device=DEV)) for _ in range(3))
    pos = _positions(1, 11, (11,), seed=6)
    out = rope_attention(q, k, v, pos, axes=(16,), backend="triton")
    assert counter.launches == 1
    out.sum().backward()
    assert counter.launches == 2 and q.grad is not None and k.grad is not None


def test_torch_compile_fullgraph_traces_rope_attention():
    torch._dynamo.reset()
    pos = _positions(1, 11, (2, 3, 4), seed=4)

    def f(q, k, v):
        return rope_attention(q, k, v, pos, axes=(6, 6, 6), backend="triton", block_causal=4)

    q, k, v = (torch.randn(1, 2, 11, 24, device=DEV) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves_c, leaves_e = [_leaf(t) for t in (q, k, v)], [_leaf(t) for t in (q, k, v)]
    yc, ye = compiled(*leaves_c), f(*leaves_e)
    assert _err(yc, ye) < 1e-6
    yc.sum().backward()
    ye.sum().backward()
    for a, b in zip(leaves_c, leaves_e):
        assert _err(a.grad, b.grad) < 1e-6


def test_auto_matches_triton():
    q, k, v = (torch.randn(2, 2, 13, 24, device=DEV) for _ in range(3))
    pos = _positions(2, 13, (13,), seed=5)
    a = rope_attention(q, k, v, pos, axes=(16,), backend="auto")
    b = rope_attention(q, k, v, pos, axes=(16,), backend="triton")
    assert _err(a, b) < 1e-5


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(axes=(7,)), ValueError, "even"),
    (dict(axes=(10, 10, 10)), ValueError, "more than the head dim"),
    (dict(axes=(8,), layout="neox"), ValueError, "unknown layout"),
    (dict(axes=(8,), pos=torch.zeros(5, 2)), ValueError, "pos must have shape"),
    (dict(axes=(8,), pos=torch.zeros(3, 9, 1)), ValueError, "pos must have shape"),
    (dict(axes=(8,), pos=torch.zeros(9, 1, dtype=torch.bool)), TypeError, "real numbers"),
])
def test_bad_input_errors(kwargs, exc, match):
    x = torch.randn(2, 1, 9, 24)
    pos = kwargs.pop("pos", torch.zeros(9, len(kwargs["axes"])))
    with pytest.raises(exc, match=match):
        apply_rope(x, pos, **kwargs)
    with pytest.raises(exc, match=match):
        rope_attention(x, x, x, pos, **kwargs)


@pytest.mark.skipif(not os.environ.get("VJEPA2_SRC"), reason="set VJEPA2_SRC to a vjepa2 checkout to compare")
def test_matches_vjepa2_rotate_queries_or_keys():
    sys.path.insert(0, os.environ["VJEPA2_SRC"])
    from src.models.utils.modules import rotate_queries_or_keys

    x = torch.randn(2, 3, 40, 20, device=DEV)
    ids = torch.randint(0, 9, (2, 40), device=DEV)
    want = rotate_queries_or_keys(x, ids[:, None].repeat(1, 3, 1))
    for backend in ("torch", "triton"):
        got = apply_rope(x, ids[..., None], axes=(20,), backend=backend)
        assert _err(got, want) < 1e-6
