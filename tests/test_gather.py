"""Masked gather (+ fused pos add) and apply_masks against torch.gather / index_add references.

Runs the Triton kernels under the interpreter on the CPU (conftest sets TRITON_INTERPRET=1), plus the plain
PyTorch fallback. fp32 results must match bitwise: the gather copies values, and the backward sums each
destination row in the same ascending order as ``index_add_``.
"""
import pytest
import torch

import iwm_fast.ops.gather as G
from iwm_fast.ops import apply_masks, masked_gather

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ref_gather(x, idx):
    return torch.gather(x, 1, idx.long()[..., None].expand(-1, -1, x.shape[-1]))


def ref_scatter(grad, idx, B, N):
    """[B, N, D] sum of grad rows at (b, idx[b, k]) with index_add_ (sequential, deterministic on CPU)."""
    R, K, D = grad.shape
    key = (idx.long() + (torch.arange(R) % B)[:, None] * N).reshape(-1)
    return torch.zeros(B * N, D, dtype=grad.dtype).index_add_(0, key.cpu(), grad.reshape(-1, D).cpu()).view(B, N, D)


def ijepa_apply_masks(x, masks):
    # I-JEPA's formula: gather each mask with an index repeated over D, concatenate along batch.
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks], dim=0)


@pytest.fixture(params=[pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def path(request):
    # The op's backend on CPU tensors: the Triton kernel under the interpreter (a GPU machine runs the CUDA tests
    # below instead), or auto (PyTorch on the CPU).
    return "triton" if request.param == "triton" else "auto"


@pytest.mark.parametrize("B,N,D,K", [(2, 197, 24, 50), (3, 16, 80, 16), (1, 7, 5, 1), (2, 13, 40, 0)])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_forward_backward_match_reference(path, B, N, D, K, idx_dtype):
    g = torch.Generator().manual_seed(B * 1000 + N + K)
    x = torch.randn(B, N, D, generator=g, requires_grad=True)
    idx = torch.randint(0, N, (B, K), generator=g).to(idx_dtype)  # duplicates likely
    out = masked_gather(x, idx, backend=path)
    assert out.shape == (B, K, D) and out.is_contiguous()
    torch.testing.assert_close(out, ref_gather(x, idx), rtol=0, atol=0)
    grad = torch.randn(B, K, D, generator=g)
    (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(gx, ref_scatter(grad, idx, B, N), rtol=0, atol=0)


def test_duplicates_sum_in_index_add_order(path):
    B, N, D = 2, 5, 16
    x = torch.randn(B, N, D, requires_grad=True)
    idx = torch.tensor([[3, 3, 3, 0, 3], [1, 1, 4, 1, 1]])
    grad = torch.randn(B, 5, D) * torch.logspace(-6, 6, D)  # magnitudes that make the sum order visible
    (gx,) = torch.autograd.grad(masked_gather(x, idx, backend=path), x, grad)
    torch.testing.assert_close(gx, ref_scatter(grad, idx, B, N), rtol=0, atol=0)
    (gx2,) = torch.autograd.grad(masked_gather(x, idx, backend=path), x, grad)
    assert torch.equal(gx, gx2)


@pytest.mark.parametrize("pos_shape", ["ND", "1ND", "BND"])
def test_fused_pos_add(path, pos_shape):
    B, N, D, K = 3, 197, 24, 31
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, N, D, generator=g, requires_grad=True)
    shape = {"ND": (N, D), "1ND": (1, N, D), "BND": (B, N, D)}[pos_shape]
    pos = torch.randn(*shape, generator=g, requires_grad=True)
    idx = torch.randint(0, N, (B, K), generator=g)
    out = masked_gather(x, idx, pos, backend=path)
    p3 = pos if pos.dim() == 3 else pos[None]
    ref = ref_gather(x, idx) + ref_gather(p3.expand(B, N, D), idx)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn(B, K, D, generator=g)
    gx, gp = torch.autograd.grad(out, (x, pos), grad)
    torch.testing.assert_close(gx, ref_scatter(grad, idx, B, N), rtol=0, atol=0)
    if pos_shape == "BND":
        ref_gp = ref_scatter(grad, idx, B, N)
    else:  # shared pos: every (b, k) lands on row idx[b, k], summed in flat order
        ref_gp = torch.zeros(N, D).index_add_(0, idx.reshape(-1), grad.reshape(-1, D)).view(shape)
    torch.testing.assert_close(gp, ref_gp, rtol=0, atol=0)


def test_expanded_mask_token_and_pos(path):
    # The predictor's call: mask_token.expand(B, N, D) (stride 0) plus pos_embed[idx].
    B, N, D, K = 4, 19, 40, 11
    g = torch.Generator().manual_seed(3)
    token = torch.randn(1, 1, D, generator=g, requires_grad=True)
    pos = torch.randn(N, D, generator=g, requires_grad=True)
    idx = torch.randint(0, N, (B, K), generator=g)
    out = masked_gather(token.expand(B, N, D), idx, pos, backend=path)
    torch.testing.assert_close(out, token + pos[idx], rtol=0, atol=0)
    grad = torch.randint(-8, 8, (B, K, D), generator=g).float()  # integer-valued: exact in any sum order
    gt, gp = torch.autograd.grad(out, (token, pos), grad)
    torch.testing.assert_close(gt, grad.sum((0, 1)).view(1, 1, D), rtol=0, atol=0)
    torch.testing.assert_close(gp, torch.zeros(N, D).index_add_(0, idx.reshape(-1), grad.reshape(-1, D)))
    # and the context path: pos[None].expand(B, N, D) as x, no pos argument
    out2 = masked_gather(pos[None].expand(B, N, D), idx, backend=path)
    (gp2,) = torch.autograd.grad(out2, pos, grad)
    torch.testing.assert_close(gp2, gp, rtol=0, atol=0)


@pytest.mark.parametrize("M", [1, 3])
def test_apply_masks_matches_ijepa(path, M, monkeypatch):
    B, N, D, K = 3, 197, 24, 23
    g = torch.Generator().manual_seed(M)
    x = torch.randn(B, N, D, generator=g, requires_grad=True)
    pos = torch.randn(N, D, generator=g)
    masks = [torch.randint(0, N, (B, K), generator=g) for _ in range(M)]
    launches = []
    if path == "triton":
        import iwm_fast.kernels.gather as kg
        real = kg.gather_forward
        monkeypatch.setattr(kg, "gather_forward", lambda *a, **k: launches.append(1) or real(*a, **k))
    out = apply_masks(x, masks, backend=path)
    if path == "triton":
        assert len(launches) == 1, "apply_masks must gather all masks in one launch"
    ref = ijepa_apply_masks(x, masks)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(apply_masks(x, torch.stack(masks), backend=path), ref, rtol=0, atol=0)
    torch.testing.assert_close(apply_masks(x, masks, pos=pos, backend=path), ijepa_apply_masks(x + pos, masks),
                               rtol=0, atol=0)
    grad = torch.randint(-8, 8, out.shape, generator=g).float()
    (gx,) = torch.autograd.grad(out, x, grad)
    (rx,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(gx, rx, rtol=0, atol=0)


def test_gradcheck_float64(path):
    B, N, D = 2, 5, 3
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 4, 4, 2], [1, 1, 3, 0]])
    assert torch.autograd.gradcheck(lambda a, p: apply_masks(a, [idx, idx.flip(1)], pos=p, backend=path), (x, pos))


def test_mixed_dtype_pos_promotes(path):
    x = torch.randn(2, 9, 16).half()
    pos = torch.randn(9, 16)
    idx = torch.randint(0, 9, (2, 4))
    out = masked_gather(x, idx, pos, backend=path)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_gather(x.float(), idx) + pos[idx], rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 10, 8)
    with pytest.raises(IndexError, match="index 10 is out of range for 10 tokens"):
        masked_gather(x, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(IndexError, match="index -1 is out of range"):
        apply_masks(x, [torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0, -1], [1, 2]])])
    with pytest.raises(TypeError, match="int64 or int32"):
        masked_gather(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch 3"):
        masked_gather(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        masked_gather(x[0], torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="pos must be"):
        masked_gather(x, torch.zeros(2, 2, dtype=torch.long), pos=torch.randn(9, 8))
    with pytest.raises(ValueError, match="same"):
        apply_masks(x, [torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="empty"):
        apply_masks(x, [])
    with pytest.raises(ValueError, match="index check mode"):
        G.set_index_check("sometimes")


def test_index_check_modes(monkeypatch):
    x = torch.randn(2, 10, 8)
    bad = torch.tensor([[0, 12], [1, 2]])
    try:
        G.set_index_check("device")  # on the CPU the device mode uses the (free) host check
        with pytest.raises(IndexError):
            masked_gather(x, bad)
        G.set_index_check("off")
        good = torch.tensor([[0, 9], [1, 2]])
        torch.testing.assert_close(masked_gather(x, good), ref_gather(x, good))
    finally:
        G.set_index_check("host")


def test_torch_compile_traces_the_op(path):
    B, N, D, K = 2, 11, 16, 5
    x = torch.randn(B, N, D, requires_grad=True)
    pos = torch.randn(N, D, requires_grad=True)
    masks = [torch.randint(0, N, (B, K)) for _ in range(2)]

    def f(x, pos, m0, m1):
        return (apply_masks(x, [m0, m1], pos=pos, backend=path) * 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(x, pos, *masks)
    gx, gp = torch.autograd.grad(loss, (x, pos))
    rx, rp = torch.autograd.grad(f(x, pos, *masks), (x, pos))
    torch.testing.assert_close(loss, f(x, pos, *masks))
    torch.testing.assert_close(gx, rx, rtol=0, atol=0)
    torch.testing.assert_close(gp, rp, rtol=0, atol=0)


@pytest.mark.cuda  # bf16 kernels run on CUDA only
def test_cuda_bf16_matches_reference():
    B, N, D, K = 8, 256, 1280, 150
    x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, N, (B, K), device="cuda")
    out = masked_gather(x, idx, pos)
    ref = ref_gather(x, idx) + pos[idx]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    key = (idx + torch.arange(B, device="cuda")[:, None] * N).reshape(-1)
    ref_gx = torch.zeros(B * N, D, device="cuda", dtype=torch.float64).index_add_(
        0, key, grad.reshape(-1, D).double()).view(B, N, D)
    # fp32 accumulation, one bf16 rounding: within half a bf16 ulp of the float64 sum
    torch.testing.assert_close(gx.double(), ref_gx, rtol=2 ** -8, atol=1e-6)
    (gx2,) = torch.autograd.grad(masked_gather(x, idx, pos), x, grad)
    assert torch.equal(gx, gx2), "backward must be deterministic"
