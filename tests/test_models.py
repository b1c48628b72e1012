import pytest
import torch
import torch.nn.functional as F

from iwm_fast.models import IWM, IWMPredictor, VisionTransformer, build_vit, vit_tiny
from iwm_fast.models.pos_embed import sincos_2d


def ijepa_vit_keys(depth, dim, patch, in_chans=3, num_patches=64, mlp_ratio=4):
    """Key names and shapes of an I-JEPA ViT checkpoint, written out from the release's layout."""
    shapes = {"pos_embed": (1, num_patches, dim), "patch_embed.proj.weight": (dim, in_chans, patch, patch),
              "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,)}
    h = int(dim * mlp_ratio)
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                       p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                       p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                       p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                       p + "mlp.fc1.weight": (h, dim), p + "mlp.fc1.bias": (h,),
                       p + "mlp.fc2.weight": (dim, h), p + "mlp.fc2.bias": (dim,)})
    return shapes


def test_ijepa_state_dict_round_trips_strict():
    model = vit_tiny(img_size=32, patch_size=4)
    shapes = ijepa_vit_keys(12, 192, 4)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    g = torch.Generator().manual_seed(0)
    ckpt = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    model.load_state_dict(ckpt, strict=True)
    out = model.state_dict()
    assert all(torch.equal(out[k], ckpt[k]) for k in ckpt)
    fresh = vit_tiny(img_size=32, patch_size=4)
    fresh.load_state_dict(out, strict=True)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_sincos_matches_closed_form():
    dim, grid = 8, (2, 3)
    pe = sincos_2d(dim, grid)
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    for h in range(2):
        for w in range(3):
            want = torch.cat([torch.sin(w * omega), torch.cos(w * omega), torch.sin(h * omega), torch.cos(h * omega)])
            torch.testing.assert_close(pe[h * 3 + w].double(), want, rtol=0, atol=1e-6)


def test_masked_forward_keeps_named_tokens():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=0, num_heads=2)
    x = torch.rand(2, 3, 16, 16)
    idx = torch.tensor([[0, 5, 15], [3, 3, 7]])
    full = model.patch_embed(x) + model.pos_embed
    want = model.norm(torch.stack([full[b, idx[b]] for b in range(2)]))
    torch.testing.assert_close(model(x, idx), want)
    both = model(x, [idx, idx.flip(1)])
    assert both.shape == (4, 3, 32)


def _predictor(cond, mode="union", depth=2):
    torch.manual_seed(0)
    return IWMPredictor((4, 4), 32, 16, depth=depth, num_heads=2, conditioning=cond, action_dim=5,
                        target_mode=mode)


def _masks(B=2, M=3, Nt=4, Nc=6):
    g = torch.Generator().manual_seed(1)
    ctx = torch.stack([torch.randperm(16, generator=g)[:Nc] for _ in range(B)])
    tgt = torch.stack([torch.stack([torch.randperm(16, generator=g)[:Nt] for _ in range(M)]) for _ in range(B)])
    return ctx, tgt


@pytest.mark.parametrize("cond", ["feature", "sequence"])
def test_prediction_depends_on_action(cond):
    pred = _predictor(cond)
    if cond == "feature":  # its last layer starts at zero (see the next test); give it trained-like weights
        torch.nn.init.normal_(pred.action_mlp[-1].weight, std=0.02)
    ctx_idx, tgt = _masks()
    z = torch.randn(2, 6, 32)
    a = torch.randn(2, 5)
    out1, out2 = pred(z, ctx_idx, tgt, a), pred(z, ctx_idx, tgt, a + 5.0)
    assert out1.shape == (2, 12, 32)
    # far above float32 rounding (~1e-7 relative): the action reaches every predicted token
    assert ((out1 - out2).abs().amax(-1) > 1e-4 * out1.abs().max()).all()
    a2 = a.clone()
    a2[1] += 1.0  # changing sample 1's action leaves sample 0's prediction alone
    torch.testing.assert_close(pred(z, ctx_idx, tgt, a2)[0], out1[0])


def test_feature_conditioning_starts_as_ijepa_mask_tokens():
    """At initialisation the action MLP adds nothing: the predictor equals the unconditioned one, weight for weight."""
    pred, plain = _predictor("feature"), _predictor("none")
    plain.load_state_dict({k: v for k, v in pred.state_dict().items() if not k.startswith("action_mlp.")})
    ctx_idx, tgt = _masks()
    z = torch.randn(2, 6, 32)
    torch.testing.assert_close(pred(z, ctx_idx, tgt, torch.randn(2, 5)), plain(z, ctx_idx, tgt))
    # the hidden layers keep their input's scale (fan-in init), unlike the blocks' std-0.02 layers
    first = pred.action_mlp[0]
    assert abs(first.weight.std().item() * first.in_features ** 0.5 - 1.0) < 0.1


@pytest.mark.parametrize("cond", ["feature", "sequence"])
def test_predictor_learns_an_action_dependent_target(cond, monkeypatch):
    """A target that is a function of the action alone: the action-blind optimum leaves its whole variance as
    loss; the conditioned predictor must get far below that within 150 Adam steps. (With every conditioning
    layer at std 0.02, feature conditioning stayed at 0.83 of the blind loss.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch gather: the Triton one is tested on its own
    pred = _predictor(cond)
    ctx_idx, tgt = _masks(B=32, M=1)
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(5, 32, generator=g)
    opt = torch.optim.Adam(pred.parameters(), lr=3e-3)
    for step in range(151):
        a = torch.rand(32, 5, generator=g) - 0.5
        z = torch.randn(32, 6, 32, generator=g)
        want = torch.tanh(a @ mix)[:, None, :].expand(-1, tgt.shape[-1], -1)
        loss = F.mse_loss(pred(z, ctx_idx, tgt, a), want)
        if step == 0:
            blind = want.var(dim=0, unbiased=False).mean().item()  # best loss without the action
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * blind, (loss.item(), blind)


def test_no_conditioning_ignores_action():
    pred = _predictor("none")
    ctx_idx, tgt = _masks()
    z = torch.randn(2, 6, 32)
    torch.testing.assert_close(pred(z, ctx_idx, tgt, torch.randn(2, 5)), pred(z, ctx_idx, tgt, None))


def test_per_block_matches_ijepa_formula():
    """I-JEPA's predictor, written out step by step: context repeated per block, mask tokens at the block."""
    pred = _predictor("none", "per_block")
    ctx_idx, tgt = _masks()
    B, M, Nt = tgt.shape
    z = torch.randn(B, 6, 32)
    out = pred(z, ctx_idx, tgt)
    pos = pred.predictor_pos_embed[0]
    rows = []
    for j in range(M):
        for b in range(B):
            x = pred.predictor_embed(z[b]) + pos[ctx_idx[b]]
            t = pred.mask_token[0] + pos[tgt[b, j]]
            s = torch.cat([x, t])[None]
            for blk in pred.predictor_blocks:
                s = blk(s)
            rows.append(pred.predictor_proj(pred.predictor_norm(s[0, -Nt:])))
    torch.testing.assert_close(out, torch.stack(rows), rtol=1e-4, atol=1e-5)
    # I-JEPA's list-of-masks form gives the same result
    torch.testing.assert_close(pred(z, [ctx_idx], list(tgt.unbind(1))), out)


def test_iwm_loss_targets_are_layer_normed_target_features():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    model = IWM(enc, _predictor("feature"))
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    ctx_idx, tgt = _masks()
    h = F.layer_norm(model.target_encoder(y), (32,))
    want = torch.stack([h[b, tgt[b].reshape(-1)] for b in range(2)])
    torch.testing.assert_close(model.targets(y, tgt), want)
    a = torch.randn(2, 5)
    loss = model(x, y, ctx_idx, tgt, a)
    torch.testing.assert_close(loss, ((model.predict(x, ctx_idx, tgt, a) - want) ** 2).mean())
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown model size 'enormous'"):
        build_vit("enormous")
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="pixels"):
        model(torch.rand(1, 3, 20, 20))
    with pytest.raises(ValueError, match="unknown conditioning"):
        IWMPredictor((4, 4), 32, 16, conditioning="film", action_dim=3)
    with pytest.raises(ValueError, match="action"):
        _predictor("feature")(torch.randn(2, 6, 32), *_masks(), None)


def test_sizes_match_ijepa_table():
    from iwm_fast.models import VIT_SIZES
    want = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
            "huge": (1280, 32, 16), "giant": (1408, 40, 16)}
    assert {k: (v.embed_dim, v.depth, v.num_heads) for k, v in VIT_SIZES.items()} == want


def test_patch_init_std_changes_only_the_patch_embedding():
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, attn_backend="sdpa")
    torch.manual_seed(3)
    plain = VisionTransformer(**kw)
    torch.manual_seed(3)
    wide = VisionTransformer(**kw, patch_init_std=0.3)
    assert abs(plain.patch_embed.proj.weight.std().item() - 0.02) < 0.003
    assert abs(wide.patch_embed.proj.weight.std().item() - 0.3) < 0.03
    for k, v in plain.state_dict().items():
        if k != "patch_embed.proj.weight":
            assert torch.equal(v, wide.state_dict()[k]), k
    with pytest.raises(ValueError, match="patch_init_std"):
        VisionTransformer(**kw, patch_init_std=0.0)
