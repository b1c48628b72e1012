"""patch_model on a timm-style and an I-JEPA-style ViT written here: same numbers, same parameters, undoable."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iwm_fast.patch import PatchedAttention, patch_model, unpatch_model


# ---- two small ViTs in the styles the patcher targets (written for this test) ------------------------------
class TimmStyleAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = False
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q * self.scale) @ k.transpose(-1, -2)
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        w = self.attn_drop(logits.softmax(-1))
        return self.proj_drop(self.proj((w @ v).transpose(1, 2).reshape(B, N, C)))


class IJepaStyleAttention(nn.Module):
    """Returns (x, attn) like the official I-JEPA layer."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * self.scale, dim=-1)
        out = (self.attn_drop(attn) @ qkv[2]).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)), attn


class Block(nn.Module):
    def __init__(self, attn, dim):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), attn, nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.attn(self.norm1(x))
        x = x + (y[0] if isinstance(y, tuple) else y)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, style, dim=48, heads=2, depth=2, grid=14, patch=2, cls_token=False, **attn_kw):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + int(cls_token), dim) * 0.02)
        make = (lambda: TimmStyleAttention(dim, heads, **attn_kw)) if style == "timm" else \
            (lambda: IJepaStyleAttention(dim, heads))
        self.blocks = nn.ModuleList([Block(make(), dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


MODELS = {
    "ijepa": lambda: TinyViT("ijepa"),                                   # 196 tokens, head dim 24
    "timm": lambda: TinyViT("timm", cls_token=True),                      # 197 tokens
    "timm_qknorm": lambda: TinyViT("timm", dim=80 * 2, heads=2, grid=7, qk_norm=True, cls_token=True),  # hd 80
}


def _run(model, img):
    model.zero_grad(set_to_none=True)
    out = model(img)
    (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _image(model, batch=2):
    grid = int(round((model.pos_embed.shape[1] - (model.cls_token is not None)) ** 0.5))
    return torch.randn(batch, 3, 2 * grid, 2 * grid, generator=torch.Generator().manual_seed(1))


def _assert_close_to_reference(name, got, ours, ref64):
    # flash-attention style: the patched error against float64 is at most ~2x the original's own float32 error.
    err_ours = (got.double() - ref64).abs().max().item()
    err_orig = (ours.double() - ref64).abs().max().item()
    assert err_ours <= 2 * err_orig + 1e-5 * ref64.abs().max().item() + 1e-7, (name, err_ours, err_orig)


def _check_against_original(model_name, backend):
    torch.manual_seed(0)
    model = MODELS[model_name]() if isinstance(model_name, str) else model_name()
    reference = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    img = _image(model)
    out_orig, grads_orig = _run(reference, img)
    out64, grads64 = _run(ref64, img.double())
    report = patch_model(model, backend=backend)
    assert report.replaced_paths == [f"blocks.{i}.attn" for i in range(len(model.blocks))], str(report)
    assert all(isinstance(b.attn, PatchedAttention) for b in model.blocks)
    out, grads = _run(model, img)
    _assert_close_to_reference("output", out, out_orig, out64)
    assert grads.keys() == grads_orig.keys()
    for n in grads:
        _assert_close_to_reference(n, grads[n], grads_orig[n], grads64[n])
    return model, report


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_same_outputs_and_gradients_after_patching(model_name):
    _check_against_original(model_name, "sdpa")


def test_ijepa_tuple_convention_kept_with_none_weights():
    model, report = _check_against_original("ijepa", "sdpa")
    assert all("returns (x, None)" in d.detail for d in report.replaced)
    y, attn = model.blocks[0].attn(torch.randn(2, 5, 48))
    assert attn is None and y.shape == (2, 5, 48)


@pytest.mark.interpreter  # CPU tensors: the triton backend runs them under the interpreter only
def test_triton_backend_matches_under_interpreter():
    # 25 tokens, head dim 24, odd sizes for the kernel's masking; tiny because the interpreter is slow.
    _check_against_original(lambda: TinyViT("ijepa", grid=5, depth=1), "triton")


def test_parameters_and_state_dict_keys_unchanged():
    torch.manual_seed(0)
    model = MODELS["timm"]()
    params = [id(p) for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model, backend="sdpa")
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state, strict=True)  # an unpatched checkpoint loads into the patched model


def test_unpatch_restores_the_original_modules():
    torch.manual_seed(0)
    model = MODELS["ijepa"]()
    originals = [b.attn for b in model.blocks]
    img = _image(model)
    with torch.no_grad():
        before = model(img)
    patch_model(model, backend="sdpa")
    model.train(False)  # the mode set while patched carries back to the originals
    restored = unpatch_model(model)
    assert restored == ["blocks.0.attn", "blocks.1.attn"]
    assert all(b.attn is o and not o.training for b, o in zip(model.blocks, originals))
    assert not any(isinstance(m, PatchedAttention) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(img), before)
    assert unpatch_model(model) == []


def test_shared_module_and_deepcopy():
    torch.manual_seed(0)
    model = MODELS["ijepa"]()
    model.blocks[1].attn = model.blocks[0].attn  # one attention module in two slots
    report = patch_model(model, backend="sdpa")
    assert report.replaced_paths == ["blocks.0.attn"]
    assert model.blocks[1].attn is model.blocks[0].attn
    assert patch_model(model).left_alone_reasons == {"blocks.0.attn": "already patched"}
    assert model.blocks[0].attn.scale == model.blocks[0].attn.original.scale
    target = copy.deepcopy(model)  # I-JEPA builds its target encoder this way
    assert target.blocks[0].attn.qkv is not model.blocks[0].attn.qkv
    assert target.blocks[0].attn.original.qkv is target.blocks[0].attn.qkv
    unpatch_model(target)
    assert type(target.blocks[0].attn) is IJepaStyleAttention and target.blocks[1].attn is target.blocks[0].attn


def test_torch_compile_aot_eager_traces_patched_model():
    torch.manual_seed(0)
    model = MODELS["timm"]()
    patch_model(model, backend="sdpa")
    img = _image(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(img)
    out.sum().backward()
    torch.testing.assert_close(out, model(img), rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_extra_arguments_go_to_the_original_forward():
    torch.manual_seed(0)
    attn = TimmStyleAttention(48, 2)
    holder = nn.Sequential(attn)
    patch_model(holder, backend="sdpa")
    x, mask = torch.randn(2, 9, 48), torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(holder[0](x, attn_mask=mask), attn(x, attn_mask=mask), rtol=0, atol=0)


class VJepaStyleAttention(nn.Module):
    """SDPA inside, ``forward(x, mask=None)`` returning ``(x, None)``, dropout probability kept as a float."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale, self.use_sdpa = heads, (dim // heads) ** -0.5, True
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop, self.proj_drop_prob = nn.Dropout(0.0), nn.Dropout(0.0), 0.0

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.proj_drop_prob)
        if mask is not None:
            out = out * 0
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C))), None


def test_vjepa_style_attention_is_replaced_and_mask_calls_fall_back():
    torch.manual_seed(0)
    attn = VJepaStyleAttention(48, 4)
    holder = nn.Sequential(attn)
    assert patch_model(holder, backend="sdpa").replaced_paths == ["0"]
    x = torch.randn(2, 11, 48)
    y, w = holder[0](x)
    assert w is None
    torch.testing.assert_close(y, attn(x)[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(holder[0](x, mask=torch.ones(1))[0], attn(x, mask=torch.ones(1))[0])
    assert holder[0].use_sdpa is True  # attributes the wrapper lacks read through to the original
    import io
    buf = io.BytesIO()
    torch.save(holder, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded[0](x)[0], y, rtol=0, atol=0)
    attn.proj_drop_prob = 0.1  # V-JEPA hands this to SDPA as attention dropout: not ours to replace
    unpatch_model(holder)
    assert "proj_drop_prob=0.1" in patch_model(holder, backend="sdpa").left_alone_reasons["0"]


# ---- look-alikes: left alone and reported, never mis-patched -------------------------------------------------
class BeitStyleAttention(TimmStyleAttention):
    def __init__(self, dim, heads):
        super().__init__(dim, heads, qkv_bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))

    def forward(self, x, attn_mask=None):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return super().forward(x - 0 * F.linear(x, self.qkv.weight, bias)[..., :1])


class GroupedKVAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 2 * dim)  # keys and values share one projection: not 3*dim
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self.qkv(x)[..., : x.shape[-1]])


class RotaryAttention(TimmStyleAttention):
    def forward(self, x, rope):
        return super().forward(x * rope)


class NoHeadsAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self.qkv(x)[..., : x.shape[-1]])


class HeadMajorLayoutAttention(TimmStyleAttention):
    """Passes every static check, but splits qkv head-major: only the output probe can tell."""

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        w = ((q * self.scale) @ k.transpose(-1, -2)).softmax(-1)
        return self.proj((w @ v).transpose(1, 2).reshape(B, N, C))


LOOKALIKES = {
    "beit": (lambda: BeitStyleAttention(48, 2), "q_bias/v_bias"),
    "grouped_kv": (lambda: GroupedKVAttention(48, 2), "not 3*dim"),
    "rotary": (lambda: RotaryAttention(48, 2), "rotary embedding present"),
    "rope_class": (lambda: _rename(TimmStyleAttention(48, 2), "RoPEAttention"), "rotary embedding present"),
    "no_heads": (lambda: NoHeadsAttention(48), "num_heads missing"),
    "head_major": (lambda: HeadMajorLayoutAttention(48, 2), "output differs"),
    "attn_dropout": (lambda: TimmStyleAttention(48, 2, attn_drop=0.1), "attention dropout"),
    "full_width_qknorm": (lambda: _with_full_width_qnorm(TimmStyleAttention(48, 2)), "not the head dim"),
    "extra_submodule": (lambda: _with_child(TimmStyleAttention(48, 2), "lora_a", nn.Linear(48, 4)),
                        "unrecognised submodule 'lora_a'"),
}


def _rename(m, name):
    m.__class__ = type(name, (type(m),), {})
    return m


def _with_full_width_qnorm(m):
    m.q_norm = nn.LayerNorm(48)
    return m


def _with_child(m, name, child):
    m.add_module(name, child)
    return m


@pytest.mark.parametrize("kind", sorted(LOOKALIKES))
def test_lookalike_left_alone_and_reported(kind):
    torch.manual_seed(0)
    make, reason = LOOKALIKES[kind]
    model = nn.ModuleDict({"ok": TimmStyleAttention(48, 2), "odd": make()})
    odd = model["odd"]
    rng = torch.get_rng_state()
    report = patch_model(model, backend="sdpa")
    assert torch.equal(torch.get_rng_state(), rng)  # the probe uses its own generator
    assert model["odd"] is odd
    assert report.replaced_paths == ["ok"]
    assert reason in report.left_alone_reasons["odd"], str(report)
    assert "odd" in str(report)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        patch_model("not a model")
    with pytest.raises(ValueError, match="backend"):
        patch_model(nn.Linear(2, 2), backend="flash")
    assert patch_model(MODELS["ijepa"](), attention=False).replaced == []


# ---- compat helpers with I-JEPA's signatures ------------------------------------------------------------------
from iwm_fast import compat  # noqa: E402


def test_compat_apply_masks_matches_indexing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 197, 24, generator=g)
    masks = [torch.randint(0, 197, (3, k), generator=g) for k in (5, 5)]
    expected = torch.cat([x[torch.arange(3)[:, None], m] for m in masks])
    torch.testing.assert_close(compat.apply_masks(x, masks), expected, rtol=0, atol=0)
    parts = compat.apply_masks(x, masks, concat=False)
    assert len(parts) == 2 and all(torch.equal(p, x[torch.arange(3)[:, None], m]) for p, m in zip(parts, masks))
    with pytest.raises(TypeError, match="integer index"):
        compat.apply_masks(x, [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="batch"):
        compat.apply_masks(x, [torch.zeros(2, 4, dtype=torch.long)])


def test_compat_ema_update_model_matches_formula():
    torch.manual_seed(0)
    online, target = MODELS["ijepa"](), MODELS["ijepa"]()
    buffers = nn.BatchNorm1d(3)
    target.add_module("bn", buffers)
    online.add_module("bn", nn.BatchNorm1d(3))
    online.bn.running_mean.fill_(5.0)
    m = 0.996
    exact = [m * t.double() + (1 - m) * o.double() for t, o in zip(target.parameters(), online.parameters())]
    ijepa_loop = [t.detach().clone() for t in target.parameters()]
    for k, q in zip(ijepa_loop, online.parameters()):  # the official update, for the bitwise claim in the docs
        k.mul_(m).add_((1.0 - m) * q.detach())
    compat.ema_update_model(target, online, torch.tensor(m, dtype=torch.float64))
    for t, e, loop in zip(target.parameters(), exact, ijepa_loop):
        torch.testing.assert_close(t.double(), e, rtol=0, atol=1e-6)
        assert torch.equal(t, loop)
    assert torch.equal(target.bn.running_mean, torch.zeros(3))  # buffers are not averaged (as in I-JEPA)
    with pytest.raises(ValueError, match="parameters"):
        compat.ema_update_model(target, MODELS["timm"](), 0.99)
    with pytest.raises(ValueError, match="momentum"):
        compat.ema_update_model(target, online, 1.5)


def test_compat_mask_collator_reexport():
    from iwm_fast.masks import MultiBlockMaskCollator

    assert compat.MultiBlockMaskCollator is MultiBlockMaskCollator
    collator = compat.MultiBlockMaskCollator(input_size=(32, 32), patch_size=4, enc_mask_scale=(0.85, 1.0),
                                             pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                             min_keep=4, allow_overlap=False)
    batch, masks_enc, masks_pred = collator([(torch.randn(3, 32, 32), 0) for _ in range(2)])
    assert len(masks_enc) == 1 and len(masks_pred) == 4
    x = torch.randn(2, 64, 8)
    assert compat.apply_masks(x, masks_pred).shape[0] == 8


def test_example_script_runs_a_patched_step(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "patch_ijepa_step.py"
    spec = importlib.util.spec_from_file_location("patch_ijepa_step", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "1", "--batch", "2", "--backend", "sdpa"])
    out = capsys.readouterr().out
    assert "replaced 3, left alone 0" in out and "step 0: loss" in out
    diff = float(out.rsplit("max abs diff", 1)[1])
    assert diff < 1e-4
