"""Transforms against hand-computed values, float64 references (colorsys, dense 2-D Gaussian) and identities."""
import colorsys
import math

import numpy as np
import pytest
import torch

from iwm_fast.transforms import (ACTION_DIM, ACTION_LAYOUT, JitterParams, TransformConfig, TransformParams,
                                 action_vector, apply, generator, normalize, random_resized_crop_flip, resize,
                                 sample_params, to_float)
from iwm_fast.transforms.blur import gaussian_blur
from iwm_fast.transforms.color import (adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
                                       grayscale, hsv_to_rgb, rgb_to_hsv, solarize)


def _images(B=4, H=7, W=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W, generator=g)


def _const(B, v):
    return torch.full((B,), float(v))


# ----- reference implementations (float64, per pixel, independent of the code under test) -----

def _ref_luma(x):
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def _ref_hue(x, shift):
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j])
                out[b, :, i, j] = colorsys.hsv_to_rgb((h + shift[b]) % 1.0, s, v)
    return out


def _ref_jitter(x, bri, con, sat, hue):
    x = np.clip(x * bri[:, None, None, None], 0, 1)
    m = _ref_luma(x).mean(axis=(1, 2))[:, None, None, None]
    x = np.clip(con[:, None, None, None] * x + (1 - con[:, None, None, None]) * m, 0, 1)
    g = _ref_luma(x)[:, None]
    x = np.clip(sat[:, None, None, None] * x + (1 - sat[:, None, None, None]) * g, 0, 1)
    return _ref_hue(x, hue)


def _ref_blur(img, sigma, radius):
    """Dense 2-D Gaussian over a reflect-padded image, float64."""
    t = np.arange(-radius, radius + 1)
    k1 = np.exp(-0.5 * (t / sigma) ** 2)
    k2 = np.outer(k1, k1)
    k2 /= k2.sum()
    C, H, W = img.shape
    p = np.pad(img, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    out = np.zeros_like(img)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += k2[dy, dx] * p[:, dy:dy + H, dx:dx + W]
    return out


def _params(B, **over):
    """Identity parameters with chosen fields overridden."""
    ident = lambda: JitterParams(torch.zeros(B, dtype=torch.bool), _const(B, 1), _const(B, 1), _const(B, 1),
                                 _const(B, 0))
    p = TransformParams(ident(), ident(), torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool),
                        torch.zeros(B), torch.zeros(B, dtype=torch.bool), blur_radius=4, solarize_threshold=0.5)
    for k, v in over.items():
        setattr(p, k, v)
    return p


# ----- single operations -----

def test_hand_computed_values():
    x = torch.tensor([0.5, 0.8, 0.2]).view(1, 3, 1, 1)
    assert torch.allclose(adjust_brightness(x, _const(1, 1.5)).flatten(), torch.tensor([0.75, 1.0, 0.3]))
    gray = 0.299 * 0.5 + 0.587 * 0.8 + 0.114 * 0.2  # 0.6419
    assert torch.allclose(grayscale(x).flatten(), torch.full((3,), gray))
    # Saturation 0 gives the luma; saturation 2 pushes away from it: 2x - gray, clipped at 0.
    assert torch.allclose(adjust_saturation(x, _const(1, 0)).flatten(), torch.full((3,), gray))
    assert torch.allclose(adjust_saturation(x, _const(1, 2)).flatten(),
                          torch.tensor([2 * 0.5 - gray, 2 * 0.8 - gray, 0.0]), atol=1e-6)
    # Contrast blends with the image-wide mean luma: two pixels (0,0,0) and (1,1,1) have mean 0.5.
    y = torch.tensor([[0.0, 1.0]] * 3).view(1, 3, 1, 2)
    assert torch.allclose(adjust_contrast(y, _const(1, 0.5)), torch.tensor([[0.25, 0.75]] * 3).view(1, 3, 1, 2))
    # Pure red shifted by a third of the wheel is pure green.
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(adjust_hue(red, _const(1, 1 / 3)).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    s = solarize(torch.tensor([0.2, 0.5, 0.9]), 0.5)
    assert torch.allclose(s, torch.tensor([0.2, 0.5, 0.1]))


def test_identities():
    x = _images()
    B = x.shape[0]
    assert torch.equal(adjust_brightness(x, _const(B, 1)), x)
    assert torch.equal(adjust_contrast(x, _const(B, 1)), x)
    assert torch.equal(adjust_saturation(x, _const(B, 1)), x)
    assert torch.allclose(adjust_hue(x, _const(B, 0)), x, atol=1e-6)
    g = grayscale(x)
    assert torch.allclose(grayscale(g), g, atol=1e-6)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    below_one = x.clamp(max=1 - 1e-6)
    assert torch.equal(solarize(below_one, 1.0), below_one)
    x1 = x.clone()
    x1[:, :, 0, 0] = 1.0
    assert torch.equal(solarize(x1, 1.01), x1)


def test_hsv_matches_colorsys():
    x = _images(B=2, H=5, W=6, seed=3)
    x[0, :, 0, 0] = 0.4   # a gray pixel (zero chroma)
    x[0, :, 0, 1] = 0.0   # black
    x[1, :, 1, 1] = torch.tensor([0.7, 0.7, 0.2])  # tie between the two largest channels
    hsv = rgb_to_hsv(x).double().numpy()
    ref = np.array([[[colorsys.rgb_to_hsv(*x[b, :, i, j].double().tolist()) for j in range(6)] for i in range(5)]
                    for b in range(2)]).transpose(0, 3, 1, 2)
    # Hue wraps: compare on the circle.
    dh = np.abs(hsv[:, 0] - ref[:, 0])
    assert np.minimum(dh, 1 - dh).max() < 1e-6
    assert np.abs(hsv[:, 1:] - ref[:, 1:]).max() < 1e-6
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6)


def test_hue_matches_colorsys():
    x = _images(B=3, H=4, W=5, seed=1)
    shift = torch.tensor([0.1, -0.37, 0.5])
    out = adjust_hue(x, shift).double().numpy()
    ref = _ref_hue(x.double().numpy(), shift.double().numpy())
    assert np.abs(out - ref).max() < 2e-6


def test_blur_matches_dense_gaussian():
    x = _images(B=3, H=9, W=11, seed=2)
    sigma = torch.tensor([0.7, 1.6, 0.0])
    out = gaussian_blur(x, sigma, radius=4)
    for b in range(2):
        ref = _ref_blur(x[b].double().numpy(), float(sigma[b]), 4)
        assert np.abs(out[b].double().numpy() - ref).max() < 1e-6
    assert torch.equal(out[2], x[2])  # sigma 0 is an exact impulse
    tiny = gaussian_blur(x, torch.full((3,), 1e-3), radius=4)
    assert torch.allclose(tiny, x, atol=1e-7)
    c = torch.full((1, 3, 6, 6), 0.3)
    assert torch.allclose(gaussian_blur(c, torch.tensor([2.0]), 6), c, atol=1e-6)  # kernel cut to the image


# ----- apply on a batch -----

def test_apply_mixed_flags_per_sample():
    B = 6
    x = _images(B=B, H=9, W=10, seed=4)
    t = lambda *v: torch.tensor(v)
    p = _params(B)
    p.source = JitterParams(t(False, False, False, False, False, True), _const(B, 1), _const(B, 1),
                            _const(B, 1), _const(B, 0))
    p.source.brightness[5], p.source.contrast[5], p.source.saturation[5], p.source.hue[5] = 1.2, 0.7, 1.3, 0.08
    p.grayscale = t(False, True, False, False, True, False)
    p.blur = t(False, False, True, False, True, False)
    p.blur_sigma = t(0.0, 0.0, 1.1, 0.0, 0.5, 0.0).float()
    p.solarize = t(False, False, False, True, True, False)
    out = apply(x, p, "source")
    assert torch.equal(out[0], x[0])
    assert torch.allclose(out[1], grayscale(x[1:2])[0])
    ref2 = _ref_blur(x[2].double().numpy(), 1.1, 4)
    assert np.abs(out[2].double().numpy() - ref2).max() < 1e-6
    assert torch.equal(out[3], torch.where(x[3] >= 0.5, 1 - x[3], x[3]))
    g4 = _ref_luma(x[4:5].double().numpy())[0]
    ref4 = _ref_blur(np.repeat(g4[None], 3, 0), 0.5, 4)
    ref4 = np.where(ref4 >= 0.5, 1 - ref4, ref4)
    assert np.abs(out[4].double().numpy() - ref4).max() < 1e-5
    ref5 = _ref_jitter(x[5:6].double().numpy(), np.array([1.2]), np.array([0.7]), np.array([1.3]), np.array([0.08]))
    assert np.abs(out[5].double().numpy() - ref5[0]).max() < 1e-5
    # The target view only sees its own jitter, here the identity.
    assert torch.equal(apply(x, p, "target"), x)


def test_apply_target_jitter_matches_reference_and_keeps_dtype():
    B = 3
    x = _images(B=B, H=5, W=6, seed=5)
    p = sample_params(B, cfg=TransformConfig(jitter_p=1.0), seed=7, step=1)
    out = apply(x, p, "target")
    j = p.target
    ref = _ref_jitter(x.double().numpy(), *(getattr(j, n).double().numpy()
                                            for n in ("brightness", "contrast", "saturation", "hue")))
    assert np.abs(out.double().numpy() - ref).max() < 1e-5
    assert apply(x.half(), p, "target").dtype == torch.float16


def test_source_jitter_p_sets_the_source_views_own_probability():
    B = 400
    both = sample_params(B, cfg=TransformConfig(jitter_p=1.0), seed=2, step=5)
    never = sample_params(B, cfg=TransformConfig(jitter_p=1.0, source_jitter_p=0.0), seed=2, step=5)
    half = sample_params(B, cfg=TransformConfig(jitter_p=0.0, source_jitter_p=0.5), seed=2, step=5)
    assert not never.source.applied.any() and torch.equal(never.source.hue, torch.zeros(B))
    assert torch.equal(never.source.brightness, torch.ones(B))
    assert torch.equal(action_vector(never)[:, 5:], action_vector(both)[:, 5:])  # target draws unchanged
    assert not half.target.applied.any() and 150 < int(half.source.applied.sum()) < 250
    # None (the default) is jitter_p: the same draws as before the option existed
    same = sample_params(B, cfg=TransformConfig(jitter_p=0.8, source_jitter_p=0.8), seed=2, step=5)
    dflt = sample_params(B, cfg=TransformConfig(jitter_p=0.8), seed=2, step=5)
    assert torch.equal(action_vector(same), action_vector(dflt))
    with pytest.raises(ValueError, match="source_jitter_p"):
        TransformConfig(source_jitter_p=1.5)


def test_clean_source_is_identity_and_keeps_target_draws():
    x = _images(B=16, seed=6)
    cfg = TransformConfig(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0, solarize_p=1.0)
    clean = sample_params(16, cfg=cfg, seed=3, step=9, clean_source=True)
    full = sample_params(16, cfg=cfg, seed=3, step=9)
    assert torch.equal(apply(x, clean, "source"), x)
    assert torch.equal(action_vector(clean)[:, 5:10], action_vector(full)[:, 5:10])
    assert not action_vector(clean)[:, :5].any() and not action_vector(clean)[:, 10:].any()
    assert not torch.equal(apply(x, full, "source"), x)


# ----- sampling and the action vector -----

def test_same_seed_same_params_and_steps_differ():
    a = action_vector(sample_params(32, seed=5, step=11))
    b = action_vector(sample_params(32, seed=5, step=11))
    assert torch.equal(a, b)
    assert not torch.equal(a, action_vector(sample_params(32, seed=5, step=12)))
    assert not torch.equal(a, action_vector(sample_params(32, seed=6, step=11)))


@pytest.mark.cuda
def test_same_params_on_cuda():
    a = sample_params(64, seed=1, step=2)
    b = sample_params(64, seed=1, step=2, device="cuda")
    assert b.device.type == "cuda"
    assert torch.equal(action_vector(a), action_vector(b).cpu())
    x = _images(B=64, H=16, W=16)
    for view in ("source", "target"):
        assert torch.allclose(apply(x, a, view), apply(x.cuda(), b, view).cpu(), atol=1e-5)


def test_sampling_statistics_follow_config():
    cfg = TransformConfig()
    p = sample_params(20000, cfg=cfg, seed=0, step=0)
    for flag, prob in ((p.source.applied, 0.8), (p.target.applied, 0.8), (p.grayscale, 0.2), (p.blur, 0.2),
                       (p.solarize, 0.2)):
        assert abs(flag.float().mean().item() - prob) < 0.015
    on = p.source.applied
    assert p.source.brightness[on].min() >= 0.6 and p.source.brightness[on].max() <= 1.4
    assert p.source.saturation[on].min() >= 0.8 and p.source.saturation[on].max() <= 1.2
    assert p.source.hue[on].abs().max() <= 0.1 and p.source.hue[on].abs().max() > 0.09
    assert torch.equal(p.source.brightness[~on], torch.ones(int((~on).sum())))
    s = p.blur_sigma[p.blur]
    assert s.min() >= 0.1 and s.max() <= 2.0
    assert torch.equal(p.blur_sigma[~p.blur], torch.zeros(int((~p.blur).sum())))
    assert p.blur_radius == math.ceil(3 * 2.0)


def test_action_layout_matches_params():
    assert ACTION_DIM == len(ACTION_LAYOUT) == 14
    p = sample_params(64, seed=2, step=3)
    a = action_vector(p)
    assert a.shape == (64, ACTION_DIM) and a.dtype == torch.float32
    for v in ("source", "target"):
        j = getattr(p, v)
        col = lambda n: a[:, ACTION_LAYOUT.index(f"{v}_{n}")]
        assert torch.equal(col("jitter"), j.applied.float())
        for n in ("brightness", "contrast", "saturation"):
            assert torch.equal(col(n), getattr(j, n) - 1)
        assert torch.equal(col("hue"), j.hue)
    for n in ("grayscale", "blur", "solarize"):
        assert torch.equal(a[:, ACTION_LAYOUT.index(n)], getattr(p, n).float())
    assert torch.equal(a[:, ACTION_LAYOUT.index("blur_sigma")], p.blur_sigma)
    assert not action_vector(_params(5)).any()  # identity transform = zero action


def test_params_slice_and_move():
    p = sample_params(8, seed=0, step=0)
    q = p[1::2]
    assert q.batch_size == 4
    assert torch.equal(action_vector(q), action_vector(p)[1::2])
    assert p.to("cpu").batch_size == 8 and p[3].batch_size == 1


# ----- normalisation, crop and flip -----

def test_normalize_and_to_float():
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    assert torch.allclose(normalize(x), torch.zeros(2, 3, 2, 2), atol=1e-6)
    assert torch.allclose(normalize(torch.ones(3, 1, 1)).flatten(),
                          torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))
    u = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(to_float(u).flatten(), torch.tensor([0.0, 0.2, 1.0]))


def test_crop_flip_deterministic_and_in_range():
    img = (torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    a = random_resized_crop_flip(img, 24, generator=generator(0, 1, 2))
    b = random_resized_crop_flip(img, 24, generator=generator(0, 1, 2))
    c = random_resized_crop_flip(img, 24, generator=generator(0, 1, 3))
    assert a.shape == (3, 24, 24) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The full-image crop with aspect 56/40 is the plain resize; flip_p=1 mirrors it.
    full = dict(scale=(1.0, 1.0), ratio=(1.4, 1.4))
    r = resize(img, (20, 28))
    assert torch.equal(random_resized_crop_flip(img, (20, 28), **full, flip_p=0.0, generator=generator(1)), r)
    assert torch.equal(random_resized_crop_flip(img, (20, 28), **full, flip_p=1.0, generator=generator(1)),
                       r.flip(-1))
    f = random_resized_crop_flip(img.float() / 255, 16, generator=generator(2))
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 1


def test_crop_boxes_cover_scale_range():
    from iwm_fast.transforms import sample_crop_box
    g = generator(9)
    fracs = []
    for _ in range(300):
        top, left, h, w = sample_crop_box(100, 120, (0.3, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 120
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
        fracs.append(h * w / 12000)
    assert min(fracs) >= 0.28 and max(fracs) <= 1.0 and min(fracs) < 0.4 and max(fracs) > 0.8


# ----- bad input -----

@pytest.mark.parametrize("images, err, words", [
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), TypeError, "floating point"),
    (torch.zeros(3, 4, 4), ValueError, "[B, 3, H, W]"),
    (torch.zeros(2, 1, 4, 4), ValueError, "[B, 3, H, W]"),
    (torch.full((2, 3, 4, 4), 1.5), ValueError, "[0, 1]"),
    (torch.full((2, 3, 4, 4), float("nan")), ValueError, "NaN"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_apply_bad_images(images, err, words):
    with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
        apply(images, sample_params(2), "source")


def test_bad_view_params_and_config():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="view"):
        apply(x, sample_params(2), "context")
    with pytest.raises(ValueError, match="3 samples"):
        apply(x, sample_params(3), "target")
    with pytest.raises(TypeError, match="TransformParams"):
        apply(x, {"brightness": 1}, "target")
    with pytest.raises(ValueError, match="batch_size"):
        sample_params(0)
    with pytest.raises(ValueError, match="hue"):
        TransformConfig(hue=0.7)
    with pytest.raises(ValueError, match="jitter_p"):
        TransformConfig(jitter_p=1.5)
    with pytest.raises(ValueError, match="blur_sigma"):
        TransformConfig(blur_sigma=(2.0, 1.0))
    with pytest.raises(ValueError, match="brightness"):
        TransformConfig(brightness=-0.1)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        random_resized_crop_flip(torch.zeros(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop_flip(torch.zeros(3, 8, 8), 4, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="out_size"):
        random_resized_crop_flip(torch.zeros(3, 8, 8), 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        normalize(torch.zeros(2, 4, 3, 3))


def test_empty_batch_and_tensor_row_selection():
    p = sample_params(6, seed=1, step=1)
    rows = torch.tensor([4, 1])
    q = p[rows]
    assert torch.equal(action_vector(q), action_vector(p)[rows])
    empty = torch.zeros(0, 3, 8, 8)
    for view in ("source", "target"):
        assert apply(empty, p[torch.zeros(0, dtype=torch.long)], view).shape == (0, 3, 8, 8)
