"""transformers' own IJepa, ViT, DINOv2 and V-JEPA 2 models (small random configs built here) with the "iwm_fast"
attention implementation and the V-JEPA 2 rope stand-in: same outputs and gradients as unpatched, same keys."""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import iwm_fast.integrations.hf as hf  # noqa: E402  (registers "iwm_fast")
from iwm_fast.integrations.hf_rope import PatchedHFRopeAttention  # noqa: E402
from iwm_fast.patch import patch_model, unpatch_model  # noqa: E402
from iwm_fast.patch import report as patch_report  # noqa: E402

SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)  # head dim 24


def ijepa(image=28, **kw):  # 14 x 14 = 196 tokens
    return transformers.IJepaModel(transformers.IJepaConfig(**{**SMALL, **kw}, image_size=image, patch_size=2))


def vit():  # class token: 197 tokens
    return transformers.ViTModel(transformers.ViTConfig(**SMALL, image_size=28, patch_size=2), add_pooling_layer=False)


def dinov2():
    return transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, image_size=28, patch_size=2))


def vjepa2_config(**kw):  # encoder head dim 80, predictor head dim 88; 2 frames of 4 x 4 tokens
    args = dict(patch_size=4, crop_size=16, frames_per_clip=4, tubelet_size=2, hidden_size=160, num_attention_heads=2,
                num_hidden_layers=2, pred_hidden_size=176, pred_num_attention_heads=2, pred_num_hidden_layers=2,
                num_pooler_layers=1, pred_num_mask_tokens=2, num_labels=3)
    return transformers.VJEPA2Config(**{**args, **kw})


def _masks(batch=2):
    g = torch.Generator().manual_seed(3)
    pick = lambda k: [torch.stack([torch.randperm(32, generator=g)[:k].sort().values for _ in range(batch)])]
    return pick(20), pick(9)


def _images(model, batch=2):
    size = model.config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _video(batch=2):
    return torch.randn(batch, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _image_out(model, x):
    return model(x.to(model.dtype)).last_hidden_state


def _vjepa2_out(model, x):
    ctx, tgt = _masks()
    out = model(x.to(model.dtype), context_mask=ctx, target_mask=tgt)
    return torch.cat([out.last_hidden_state.flatten(), out.predictor_output.last_hidden_state.flatten()])


def _classifier_out(model, x):
    return model(x.to(model.dtype)).logits


CASES = {
    "ijepa": (ijepa, _images, _image_out, 2),
    "vit": (vit, _images, _image_out, 2),
    "dinov2": (dinov2, _images, _image_out, 2),
    "vjepa2": (lambda: transformers.VJEPA2Model(vjepa2_config()), lambda m: _video(), _vjepa2_out, 4),
    "vjepa2_classifier": (lambda: transformers.VJEPA2ForVideoClassification(vjepa2_config()), lambda m: _video(),
                          _classifier_out, 6),
}


def _run(model, fn, x):
    model.zero_grad(set_to_none=True)
    out = fn(model, x)
    (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(name, got, ours, ref64):
    # flash-attention's rule: the patched error against float64 at most ~2x the original float32 error.
    err, base = (got.double() - ref64).abs().max().item(), (ours.double() - ref64).abs().max().item()
    assert err <= 2 * base + 1e-5 * ref64.abs().max().item() + 1e-7, (name, err, base)


def _check(case, backend="auto"):
    make, inputs, fn, swaps = CASES[case]
    torch.manual_seed(0)
    model = make().train()
    reference, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    x = inputs(model)
    out_ref, grads_ref = _run(reference, fn, x)
    out64, grads64 = _run(ref64, fn, x.double())
    report = patch_model(model, backend=backend)
    assert len(report.replaced) == swaps and not report.left_alone, str(report)
    assert list(model.state_dict()) == keys
    out, grads = _run(model, fn, x)
    _close("output", out, out_ref, out64)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        _close(n, grads[n], grads_ref[n], grads64[n])
    return model, report


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_gradients_match_unpatched(case):
    model, report = _check(case)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("PatchedHFRopeAttention" in kinds) == case.startswith("vjepa2")
    assert all(c._attn_implementation == "iwm_fast" for c in {id(m.config): m.config for m in model.modules()
                                                                if hasattr(m, "config")}.values())


def test_triton_backend_under_the_interpreter():
    # Tiny: the interpreter is slow. 25 tokens of head dim 24 (IJepa), and V-JEPA 2's rotary pass + kernel.
    CASES["ijepa_tiny"] = (lambda: ijepa(image=10, num_hidden_layers=1), _images, _image_out, 1)
    try:
        _check("ijepa_tiny", backend="triton")
    finally:
        del CASES["ijepa_tiny"]
    torch.manual_seed(0)
    model = transformers.VJEPA2Model(vjepa2_config(num_hidden_layers=1, pred_num_hidden_layers=1)).eval()
    x = _video(1)
    with torch.no_grad():
        ref = model.encoder(x).last_hidden_state
        patch_model(model.encoder, backend="triton")
        torch.testing.assert_close(model.encoder(x).last_hidden_state, ref, rtol=1e-4, atol=1e-4)


def test_unpatch_restores_modules_and_implementation():
    torch.manual_seed(0)
    model = transformers.VJEPA2Model(vjepa2_config()).eval()
    originals = [layer.attention for layer in model.encoder.layer]
    x = _video()
    with torch.no_grad():
        before = _vjepa2_out(model, x)
    patch_model(model, backend="sdpa")
    assert isinstance(model.encoder.layer[0].attention, PatchedHFRopeAttention)
    assert len(unpatch_model(model)) == 4
    assert model.config._attn_implementation == "sdpa"
    assert [layer.attention for layer in model.encoder.layer] == originals
    assert not any(hasattr(m, "_iwm_backend") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(_vjepa2_out(model, x), before)


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    torch.manual_seed(0)
    ijepa().save_pretrained(tmp_path)
    x = torch.randn(2, 3, 28, 28)
    plain = transformers.IJepaModel.from_pretrained(tmp_path).eval()
    fast = transformers.IJepaModel.from_pretrained(tmp_path, attn_implementation="iwm_fast").eval()
    assert fast.config._attn_implementation == "iwm_fast" and plain.config._attn_implementation == "sdpa"
    calls = []
    original = hf.attention
    hf.attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            torch.testing.assert_close(fast(x).last_hidden_state, plain(x).last_hidden_state, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2  # both layers went through the fused path
        plain.set_attn_implementation("iwm_fast")
        with torch.no_grad():
            plain(x)
        assert len(calls) == 4
    finally:
        hf.attention = original


def _fresh_pair(**kw):
    torch.manual_seed(0)
    model = ijepa(**kw)
    return copy.deepcopy(model), model


@pytest.mark.parametrize("case", ["mask", "output_attentions", "dropout"])
def test_unsupported_calls_fall_back_with_the_reason_once(case, caplog):
    reference, model = _fresh_pair(attention_probs_dropout_prob=0.1 if case == "dropout" else 0.0)
    patch_model(model, backend="sdpa")
    x = _images(model)
    kwargs = {"output_attentions": True} if case == "output_attentions" else {}
    if case == "mask":
        kwargs["attention_mask"] = torch.ones(2, 196, dtype=torch.long).index_fill_(1, torch.arange(150, 196), 0)
    if case != "dropout":
        reference.eval(), model.eval()
        if case == "output_attentions":
            reference.set_attn_implementation("eager")
    patch_report._SAID.clear()  # each case must say its reason afresh
    with caplog.at_level(logging.WARNING, logger="iwm_fast"):
        outs = []
        for m in (reference, model):
            torch.manual_seed(5)
            outs.append(m(x, **kwargs))
    torch.testing.assert_close(outs[1].last_hidden_state, outs[0].last_hidden_state, rtol=1e-5, atol=1e-5)
    reason = {"mask": "attention mask", "output_attentions": "output_attentions", "dropout": "dropout"}[case]
    lines = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(lines) == 1, lines  # two layers fell back, the reason was said once
    if case == "output_attentions":
        assert all(a is not None for a in outs[1].attentions)
        torch.testing.assert_close(outs[1].attentions[0], outs[0].attentions[0])


def test_compile_fullgraph_forward_and_backward():
    # aot_eager traces forward and backward as inductor does, without its minutes of C++ code generation here.
    torch.manual_seed(0)
    model = transformers.VJEPA2Model(vjepa2_config(num_hidden_layers=1)).encoder
    patch_model(model, backend="sdpa")
    x = _video()
    eager = model(x).last_hidden_state
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x).last_hidden_state
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    assert model.layer[0].attention.query.weight.grad is not None
