"""Block-causal attention (ops.attention(..., block_causal=F)) against a float64 reference.

The reference mask is built block by block, as V-JEPA 2-AC describes it: the tokens of frame t (F of them:
action tokens, then patches) attend to every token of frames 0..t. Tolerance as in test_attention.py.
"""
import pytest
import torch
import torch.nn.functional as F

from iwm_fast.ops import attention

F16, F32 = torch.float16, torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels: on the GPU, or interpreted on the CPU


def _frame_mask(n, frame):
    mask = torch.zeros(n, n, dtype=torch.bool)
    for t1 in range(-(-n // frame)):
        for t2 in range(t1 + 1):
            mask[t1 * frame:(t1 + 1) * frame, t2 * frame:(t2 + 1) * frame] = True
    return mask


def _reference(q, k, v, frame, key_lengths=None):
    n = q.shape[-2]
    mask = _frame_mask(n, frame).to(q.device).expand(q.shape[0], 1, n, n).clone()
    if key_lengths is not None:
        for b, kl in enumerate(key_lengths.tolist()):
            mask[b, :, :, kl:] = False
    s = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1))  # a sample without keys: zeros
    return p @ torch.where(mask.any(-2, keepdim=True).transpose(-1, -2), v, 0)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _inputs(B, H, N, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(DEV, dtype) for _ in range(4)]


def _check(q, k, v, do, frame, backend, key_lengths=None):
    leaves = [_leaf(t) for t in (q, k, v)]
    out = attention(*leaves, block_causal=frame, key_lengths=key_lengths, backend=backend)
    out.backward(do)
    ref_in = [_leaf(t.double()) for t in (q, k, v)]
    ref = _reference(*ref_in, frame, key_lengths)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    pt_in = [_leaf(t) for t in (q, k, v)]
    pt = _reference(*pt_in, frame, key_lengths)
    pt_grads = torch.autograd.grad(pt, pt_in, do)
    eps_unit = 8 * torch.finfo(torch.float32).eps * q.shape[-1] ** 0.5
    for name, got, lowp, want in [("out", out, pt, ref)] + list(zip(("dq", "dk", "dv"), [t.grad for t in leaves],
                                                                     pt_grads, ref_grads)):
        eps = eps_unit * max(1.0, want.abs().max().item())
        err, pt_err = _err(got, want), _err(lowp, want)
        assert torch.isfinite(got).all(), name
        assert err <= 2 * pt_err + eps, f"{name}: max error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + {eps:.3g}"


# (B, H, N, D, frame, dtype): frames that straddle the kernel's 64/32-row tiles, V-JEPA 2-AC's layout (2 action
# tokens + a 3x3 grid per frame, 4 frames), frame 1 (causal), one frame longer than the sequence, head dims 80/88.
CASES = [
    (2, 2, 45, 24, 7, F32),
    (1, 3, 44, 80, 11, F16),
    (1, 2, 70, 64, 1, F16),
    (1, 1, 33, 32, 100, F32),
    (1, 2, 130, 88, 20, F32),
]


@pytest.mark.parametrize("B,H,N,D,frame,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_triton_block_causal_matches_float64(B, H, N, D, frame, dtype):
    q, k, v, do = _inputs(B, H, N, D, dtype, seed=N)
    _check(q, k, v, do, frame, "triton")


def test_triton_block_causal_with_key_lengths():
    q, k, v, do = _inputs(3, 2, 40, 16, F32, seed=1)
    key_lengths = torch.tensor([40, 13, 0], device=DEV)
    _check(q, k, v, do, 6, "triton", key_lengths)
    out = attention(q, k, v, block_causal=6, key_lengths=key_lengths, backend="triton")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_pytorch_backends_block_causal(backend):
    q, k, v, do = _inputs(2, 2, 29, 16, F32, seed=2)
    _check(q, k, v, do, 5, backend)
    _check(q, k, v, do, 5, backend, torch.tensor([29, 0], device=DEV))


def test_frame_of_one_is_causal_attention():
    q, k, v, _ = _inputs(1, 2, 37, 24, F32, seed=3)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert _err(attention(q, k, v, block_causal=1, backend="triton"), want) < 1e-5


def test_opcheck_block_causal():
    from iwm_fast.ops.attention import attention_fwd

    q, k, v, _ = _inputs(1, 2, 19, 24, F32, seed=4)
    args = (_leaf(q), _leaf(k), _leaf(v), 0.2, None, 4)
    torch.library.opcheck(attention_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_block_causal(value, exc):
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(exc, match="block_causal"):
        attention(q, q, q, block_causal=value)
