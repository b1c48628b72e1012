"""timm's own ViTs (vit_* with class and register tokens, DeiT, EVA-02, the *_rope_* ViTs; small random configs
built here) patched: same outputs and gradients as unpatched, same keys, left alone where unsupported."""
import copy
import logging

import pytest
import torch

timm = pytest.importorskip("timm")

from iwm_fast.integrations.timm import PatchedTimmAttention, PatchedTimmRopeAttention  # noqa: E402
from iwm_fast.patch import patch_model, unpatch_model  # noqa: E402
from iwm_fast.patch import report as patch_report  # noqa: E402

# 28 x 28 images in 2 x 2 patches: 196 patch tokens (+ class / register tokens: 197, 200, ...), head dim 24.
SMALL = dict(pretrained=False, img_size=28, patch_size=2, embed_dim=48, depth=2, num_heads=2, num_classes=5)
CASES = {  # name: (timm model, extra kwargs, stand-in class)
    "vit": ("vit_small_patch16_224", {}, PatchedTimmAttention),
    "vit_qknorm": ("vit_small_patch16_224", {"qk_norm": True}, PatchedTimmAttention),
    "vit_registers": ("vit_base_patch16_reg4_gap_256", {}, PatchedTimmAttention),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, PatchedTimmAttention),
    "deit3": ("deit3_small_patch16_224", {}, PatchedTimmAttention),
    "eva02": ("eva02_small_patch14_224", {}, PatchedTimmRopeAttention),
    "eva02_patch_dropout": ("eva02_small_patch14_224", {"patch_drop_rate": 0.25}, PatchedTimmRopeAttention),
    "vit_rope": ("vit_base_patch16_rope_224", {}, PatchedTimmRopeAttention),
    "vit_rope_registers": ("vit_medium_patch16_rope_reg1_gap_256", {}, PatchedTimmRopeAttention),
}


def _make(case):
    name, extra, _ = CASES[case]
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **extra})


def _run(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same patch-dropout draw in every copy
    out = model.forward_features(x)
    (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(name, got, ours, ref64):
    # flash-attention's rule: the patched error against float64 at most ~2x the original float32 error.
    err, base = (got.double() - ref64).abs().max().item(), (ours.double() - ref64).abs().max().item()
    assert err <= 2 * base + 1e-5 * ref64.abs().max().item() + 1e-7, (name, err, base)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_gradients_match_unpatched(case):
    model = _make(case).train()
    reference, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    out_ref, grads_ref = _run(reference, x)
    out64, grads64 = _run(ref64, x.double())
    report = patch_model(model, backend="sdpa")
    assert report.replaced_paths == ["blocks.0.attn", "blocks.1.attn"] and not report.left_alone, str(report)
    assert all(type(b.attn) is CASES[case][2] for b in model.blocks)
    assert list(model.state_dict()) == keys
    out, grads = _run(model, x)
    _close("output", out, out_ref, out64)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        _close(n, grads[n], grads_ref[n], grads64[n])
    unpatch_model(model)
    assert [type(b.attn) for b in model.blocks] == [type(b.attn) for b in reference.blocks]


def test_triton_backend_under_the_interpreter():
    # Tiny (the interpreter is slow): EVA-02's rotary tables through the Triton rotary pass and attention kernel.
    torch.manual_seed(0)
    model = timm.create_model("eva02_small_patch14_224", **{**SMALL, "img_size": 10, "depth": 1}).eval()
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        ref = model.forward_features(x)
        assert len(patch_model(model, backend="triton").replaced) == 1
        torch.testing.assert_close(model.forward_features(x), ref, rtol=1e-4, atol=1e-4)


def test_refused_layouts_are_left_alone_with_the_reason():
    torch.manual_seed(0)
    mixed = timm.create_model("vit_small_patch16_rope_mixed_224", **SMALL)
    assert "rope_type='mixed'" in patch_model(mixed).left_alone_reasons["blocks.0.attn"]
    half = timm.create_model("eva02_small_patch14_224", **SMALL, rope_rotate_half=True)
    assert "rotate_half=True" in patch_model(half).left_alone_reasons["blocks.0.attn"]


def test_attn_mask_goes_to_the_original_with_the_reason_once(caplog):
    model = _make("vit").eval()
    reference = copy.deepcopy(model)
    patch_model(model, backend="sdpa")
    x = torch.randn(2, 3, 28, 28)
    mask = torch.ones(197, 197, dtype=torch.bool).tril()
    patch_report._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="iwm_fast"), torch.no_grad():
        got = model.forward_features(x, attn_mask=mask)
        want = reference.forward_features(x, attn_mask=mask)
    assert torch.equal(got, want)
    assert len([r for r in caplog.records if "attn_mask" in r.getMessage()]) == 1


def test_causal_attention_runs_fused():
    model = _make("vit").eval()
    reference = copy.deepcopy(model)
    patch_model(model, backend="sdpa")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, is_causal=True),
                                   reference.forward_features(x, is_causal=True), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_forward_and_backward():
    # aot_eager traces forward and backward as inductor does, without its minutes of C++ code generation here.
    model = _make("eva02")
    patch_model(model, backend="sdpa")
    x = torch.randn(2, 3, 28, 28)
    eager = model.forward_features(x)
    out = torch.compile(model.forward_features, backend="aot_eager", fullgraph=True)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    assert model.blocks[0].attn.qkv.weight.grad is not None
