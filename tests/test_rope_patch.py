"""patch_model on V-JEPA 2-style rotary attention, written here from V-JEPA 2's documented semantics.

The modules below re-implement what V-JEPA 2's ``RoPEAttention`` and ``ACRoPEAttention`` compute (same class
and attribute names and forward signatures, so the patcher's detection is exercised): three axes of
2 * ((head_dim // 3) // 2) channels with the half-frequencies repeated across the vector, positions from
flat token ids (or ``grid_size``), ACRoPE's scaled rows/columns and its action tokens, SDPA with an optional
mask. The patched model must give the same outputs (float32 relative error <= 1e-5) and gradients (within
twice the original's own float32 error against float64).
Set VJEPA2_SRC to a vjepa2 checkout (with timm and einops importable) to also run V-JEPA 2's own models.
"""
import copy
import io
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iwm_fast.patch import patch_model, unpatch_model


@pytest.fixture(autouse=True)
def _device():
    # The Triton kernels run on the GPU when there is one (interpreted on the CPU otherwise): build the models
    # and inputs there.
    if torch.cuda.is_available():
        torch.set_default_device("cuda")
        yield
        torch.set_default_device(None)
    else:
        yield


def _turn(x, pos):
    """V-JEPA 2's rotation of x [..., N, d] by positions pos [..., N] (float32 angles, repeated half-frequencies)."""
    d = x.shape[-1]
    omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=x.dtype, device=x.device) / (d / 2))
    theta = pos.to(x.dtype)[..., None] * omega
    cos, sin = theta.cos(), theta.sin()
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    even, odd = x[..., 0::2], x[..., 1::2]
    turned = torch.stack([-odd, even], -1).flatten(-2)
    return x * cos + turned * sin


def _rotate3(t, d, h, w, dd):
    parts = [_turn(t[..., :dd], d), _turn(t[..., dd:2 * dd], h), _turn(t[..., 2 * dd:3 * dd], w), t[..., 3 * dd:]]
    return torch.cat(parts, -1)


class _Base(nn.Module):
    def __init__(self, dim, num_heads, grid_size, qkv_bias=True, use_sdpa=True, is_causal=False, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=qkv_bias), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(proj_drop)
        self.proj_drop_prob, self.use_sdpa, self.is_causal = proj_drop, use_sdpa, is_causal
        self.d_dim = self.h_dim = self.w_dim = 2 * ((self.head_dim // 3) // 2)
        self.grid_size = grid_size

    def _attend(self, q, k, v, attn_mask):
        if attn_mask is not None or self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.proj_drop_prob,
                                                  is_causal=self.is_causal)
        return ((q @ k.transpose(-1, -2)) * self.scale).softmax(-1) @ v

    def _qkv(self, x):
        B, N, _ = x.shape
        return self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)


class RoPEAttention(_Base):
    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        per_frame, per_row = (H_patches * W_patches, W_patches) if None not in (H_patches, W_patches) \
            else (self.grid_size ** 2, self.grid_size)
        if mask is None:
            count = T * H_patches * W_patches if None not in (T, H_patches, W_patches) \
                else (N // self.grid_size ** 2) * self.grid_size ** 2
            ids = torch.arange(count)
        else:
            ids = mask[:, None]  # [B, 1, N]: one position per sample and token, for every head
        d, rest = ids // per_frame, ids % per_frame
        h, w = rest // per_row, rest % per_row
        q, k = (_rotate3(t, d, h, w, self.d_dim) for t in (q, k))
        out = self._attend(q, k, v, attn_mask)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class ACRoPEAttention(_Base):
    def forward(self, x, mask=None, attn_mask=None, T=None, H=None, W=None, action_tokens=0):
        B, N, C = x.shape
        ids = torch.arange(T * H * W) if mask is None else mask[:, None]
        d, rest = ids // (H * W), ids % (H * W)
        h, w = (rest // W) * (self.grid_size / H), (rest % W) * (self.grid_size / W)
        q, k, v = self._qkv(x)
        if action_tokens:
            frame = action_tokens + H * W
            is_act = (torch.arange(N) % frame) < action_tokens
            t_all = torch.arange(N) // frame
            pd = torch.zeros(N)
            ph, pw = torch.zeros(N), torch.zeros(N)
            pd[~is_act], ph[~is_act], pw[~is_act] = d.float(), h.float(), w.float()
            pd[is_act] = t_all[is_act].float()  # action tokens: frame index on the depth channels only
            d, h, w = pd, ph, pw
        q, k = (_rotate3(t, d, h, w, self.d_dim) for t in (q, k))
        out = self._attend(q, k, v, attn_mask)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


def frame_causal_mask(T, H, W, add_tokens):
    n = add_tokens + H * W
    frames = torch.arange(T * n) // n
    return frames[None, :] <= frames[:, None]


class Block(nn.Module):
    def __init__(self, dim, heads, grid_size, **kw):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), RoPEAttention(dim, heads, grid_size, **kw)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        x = x + self.attn(self.norm1(x), mask=mask, attn_mask=attn_mask, T=T, H_patches=H_patches,
                          W_patches=W_patches)
        return x + self.mlp(x)


class ACBlock(nn.Module):
    def __init__(self, dim, heads, grid_size):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ACRoPEAttention(dim, heads, grid_size)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None, attn_mask=None, T=None, H=None, W=None, action_tokens=0):
        y = self.norm1(x)
        if isinstance(self.attn, ACRoPEAttention):  # as V-JEPA 2's ACBlock picks the call
            y = self.attn(y, mask=mask, attn_mask=attn_mask, T=T, H=H, W=W, action_tokens=action_tokens)
        else:
            y = self.attn(y, mask=mask, attn_mask=attn_mask)
        x = x + y
        return x + self.mlp(x)


class Encoder(nn.Module):
    def __init__(self, dim=96, heads=1, depth=2, grid_size=4, **kw):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, grid_size, **kw) for _ in range(depth)])

    def forward(self, x, masks=None, T=None, H=None, W=None):
        for blk in self.blocks:
            x = blk(x, mask=masks, attn_mask=None, T=T, H_patches=H, W_patches=W)
        return x


class ACPredictor(nn.Module):
    def __init__(self, dim=64, heads=1, depth=2, grid_size=4):
        super().__init__()
        self.blocks = nn.ModuleList([ACBlock(dim, heads, grid_size) for _ in range(depth)])

    def forward(self, x, T, H, W, A):
        attn_mask = frame_causal_mask(T, H, W, A)
        for blk in self.blocks:
            x = blk(x, mask=None, attn_mask=attn_mask, T=T, H=H, W=W, action_tokens=A)
        return x


# ---- the cases: (model, inputs) --------------------------------------------------------------------------
def _ids(B, total, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randperm(total, generator=g, device="cpu")[:n].sort().values for _ in range(B)]
    return torch.stack(ids).to(torch.get_default_device())


CASES = {
    # video encoder, full clip: head dim 96 (3 axes of 32), 2 frames of 3x4 patches
    "video_encoder": (lambda: Encoder(96, 1, depth=1), lambda: ((torch.randn(2, 24, 96),), dict(T=2, H=3, W=4))),
    # context encoder / predictor on a masked token subset: head dim 80 (26 x 3 + 2 unrotated)
    "masked_tokens": (lambda: Encoder(160, 2, depth=1), lambda: ((torch.randn(2, 9, 160),),
                                                         dict(masks=_ids(2, 24, 9, 1), T=2, H=3, W=4))),
    # image encoder without T/H/W: positions from grid_size (one 4x4 frame), head dim 88
    "image_grid_size": (lambda: Encoder(88, 1, depth=1, grid_size=4), lambda: ((torch.randn(2, 16, 88),), {})),
    # action-conditioned predictor: 2 action tokens + 3x3 patches per frame, 3 frames, frame-causal mask
    "ac_predictor": (lambda: ACPredictor(64, 1), lambda: ((torch.randn(2, 33, 64), 3, 3, 3, 2), {})),
}
# The interpreter is slow: the Triton path runs the two cases with the most to get wrong (masks, action tokens).
TRITON_CASES = ("masked_tokens", "ac_predictor")


def _leaf(t):
    return t.detach().clone().requires_grad_(True) if t.is_floating_point() else t


def _run(model, args, kwargs, dtype=torch.float32):
    args = tuple(_leaf(a.to(dtype)) if torch.is_tensor(a) else a for a in args)
    out = model(*args, **kwargs)
    out.square().sum().backward()
    return out, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("case,backend", [(c, "sdpa") for c in sorted(CASES)] + [(c, "triton") for c in TRITON_CASES])
def test_outputs_and_gradients_equal_the_original(case, backend):
    torch.manual_seed(0)
    make, inputs = CASES[case]
    model = make()
    original, original64 = copy.deepcopy(model), copy.deepcopy(model).double()
    report = patch_model(model, backend=backend)
    assert len(report.replaced) == len(model.blocks) and not report.left_alone, str(report)
    args, kwargs = inputs()
    out, grads = _run(model, args, kwargs)
    ref, ref_grads = _run(original, args, kwargs)
    want, want_grads = _run(original64, args, kwargs, torch.float64)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    for g, r, w in zip(grads, ref_grads, want_grads):
        err, own = (g.double() - w).abs().max().item(), (r.double() - w).abs().max().item()
        assert err <= 2 * own + 1e-6 * max(1.0, w.abs().max().item())
    assert list(model.state_dict()) == list(original.state_dict())


def test_frame_causal_mask_runs_the_block_causal_kernel(monkeypatch):
    import iwm_fast.ops.rope as rope_ops

    seen = []
    real = rope_ops.attention
    monkeypatch.setattr(rope_ops, "attention", lambda *a, **kw: seen.append(kw["block_causal"]) or real(*a, **kw))
    model = ACPredictor(64, 1, depth=1)
    patch_model(model, backend="triton")
    seen.clear()  # the patch-time probe's calls
    model(torch.randn(2, 33, 64), 3, 3, 3, 2)
    assert seen and all(b == 11 for b in seen)  # 2 action tokens + 3 x 3 patches per frame


def test_other_masks_and_causal_flag_are_exact():
    torch.manual_seed(1)
    attn = RoPEAttention(96, 2, grid_size=4)
    holder = nn.ModuleList([attn])
    patch_model(holder, backend="sdpa")  # our rotation, then SDPA with the mask
    x = torch.randn(2, 16, 96)
    dense = torch.rand(16, 16) > 0.4
    dense.fill_diagonal_(True)
    want = attn(x, attn_mask=dense, T=1, H_patches=4, W_patches=4)
    got = holder[0](x, attn_mask=dense, T=1, H_patches=4, W_patches=4)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    causal = RoPEAttention(96, 2, grid_size=4, is_causal=True)
    holder = nn.ModuleList([causal])
    patch_model(holder, backend="triton")  # block-causal kernel with one token per block
    got, want = holder[0](x, T=1, H_patches=4, W_patches=4), causal(x, T=1, H_patches=4, W_patches=4)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_isinstance_unpatch_save_and_deepcopy():
    model = ACPredictor(64, 1)
    originals = [b.attn for b in model.blocks]
    patch_model(model, backend="sdpa")
    assert all(isinstance(b.attn, ACRoPEAttention) and b.attn is not o for b, o in zip(model.blocks, originals))
    x = torch.randn(1, 22, 64)
    y = model(x, 2, 3, 3, 2)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert type(other.blocks[0].attn) is type(model.blocks[0].attn)
        torch.testing.assert_close(other(x, 2, 3, 3, 2), y, rtol=0, atol=0)
    assert unpatch_model(model) == ["blocks.0.attn", "blocks.1.attn"]
    assert [b.attn for b in model.blocks] == originals


def test_torch_compile_fullgraph_traces_a_patched_block():
    torch._dynamo.reset()
    model = Encoder(96, 1, depth=1)
    patch_model(model, backend="triton")
    x, ids = torch.randn(2, 9, 96), _ids(2, 24, 9, 3)
    eager = model(x, masks=ids, T=2, H=3, W=4)  # the first real call is verified in eager mode
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, masks=ids, T=2, H=3, W=4), eager, rtol=1e-6, atol=1e-6)


# ---- left alone, with the reason ----------------------------------------------------------------------------
class FlippedRoPEAttention(RoPEAttention):
    """Same structure and names, another computation: only the probe can tell."""

    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        return super().forward(x.flip(-1), mask, attn_mask, T, H_patches, W_patches)


class ShiftedOnLongClips(RoPEAttention):
    """Matches on the probe's small calls, differs on a real call with more frames."""

    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        out = super().forward(x, mask, attn_mask, T, H_patches, W_patches)
        return out + 1.0 if T is not None and T > 2 else out


def _renamed(cls, name):
    return type(name, (cls,), {})


LEFT_ALONE = {
    "probe_mismatch": (lambda: _renamed(FlippedRoPEAttention, "RoPEAttention")(96, 2, 4), "output differs"),
    "dropout": (lambda: RoPEAttention(96, 2, 4, proj_drop=0.1), "proj_drop_prob=0.1"),
    "signature": (lambda: _renamed(type("X", (RoPEAttention,), {"forward": lambda self, x, pos: x}),
                                   "RoPEAttention")(96, 2, 4), "is not V-JEPA 2's"),
    "no_axes": (lambda: _without(RoPEAttention(96, 2, 4), "d_dim"), "no d_dim"),
}


def _without(m, name):
    delattr(m, name)
    return m


@pytest.mark.parametrize("kind", sorted(LEFT_ALONE))
def test_not_understood_is_left_alone_with_the_reason(kind):
    make, reason = LEFT_ALONE[kind]
    model = nn.ModuleDict({"odd": make()})
    report = patch_model(model, backend="sdpa")
    assert report.replaced == [] and reason in report.left_alone_reasons["odd"], str(report)


def test_first_real_call_is_verified_and_handed_back_on_mismatch(caplog):
    attn = ShiftedOnLongClips(96, 2, 4)
    holder = nn.ModuleList([attn])
    assert patch_model(holder, backend="sdpa").replaced_paths == ["0"]  # the patch-time probe uses T = 2
    x = torch.randn(1, 48, 96)
    with caplog.at_level("WARNING", logger="iwm_fast"):
        out = holder[0](x, T=4, H_patches=3, W_patches=4)
    assert torch.equal(out, attn(x, T=4, H_patches=3, W_patches=4))
    assert "differs from the original on a real call" in caplog.text
    assert torch.equal(holder[0](x, T=4, H_patches=3, W_patches=4), attn(x, T=4, H_patches=3, W_patches=4))


# ---- V-JEPA 2's own models, when a checkout is given ----------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("VJEPA2_SRC"), reason="set VJEPA2_SRC to a vjepa2 checkout to compare")
def test_vjepa2_models_are_fully_patched():
    sys.path.insert(0, os.environ["VJEPA2_SRC"])
    from src.models.ac_predictor import VisionTransformerPredictorAC
    from src.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    cases = [(VisionTransformer(img_size=(32, 32), patch_size=4, embed_dim=128, depth=2, num_heads=2, use_rope=True),
              (torch.randn(2, 3, 32, 32),)),
             (VisionTransformerPredictorAC(img_size=(32, 32), patch_size=8, num_frames=8, tubelet_size=2,
                                           embed_dim=96, predictor_embed_dim=128, depth=2, num_heads=2),
              (torch.randn(2, 64, 96), torch.randn(2, 4, 7), torch.randn(2, 4, 7)))]
    for model, inputs in cases:
        original = copy.deepcopy(model)
        report = patch_model(model, backend="triton")
        assert not report.left_alone and len(report.replaced) == 2, str(report)
        out, ref = model(*inputs), original(*inputs)
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
