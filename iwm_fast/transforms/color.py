"""Batched colour operations on float images [B, 3, H, W] in [0, 1] with one factor per sample.

Semantics follow torchvision's functional colour ops on float tensors: results are clipped to [0, 1];
contrast blends with the mean of the grayscale image, saturation with the grayscale image itself.
"""
import torch

# ITU-R 601-2 luma weights, as in PIL's "L" conversion. They sum to 1, so grayscale is idempotent and keeps
# gray pixels unchanged (torchvision's rgb_to_grayscale uses 0.2989 for red, a 1e-4 difference).
LUMA = (0.299, 0.587, 0.114)


def _per_sample(f, x):
    return f.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def luma(x):
    """[B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = x.unbind(dim=-3)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(-3)


def grayscale(x):
    """Luma replicated to three channels."""
    return luma(x).expand_as(x).contiguous()


def blend(x, other, factor):
    """``factor * x + (1 - factor) * other``, clipped to [0, 1]; factor 1 returns x exactly."""
    f = _per_sample(factor, x)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x, factor):
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x, factor):
    mean = luma(x).mean(dim=(-3, -2, -1), keepdim=True)
    return blend(x, mean, factor)


def adjust_saturation(x, factor):
    return blend(x, luma(x), factor)


def rgb_to_hsv(x):
    """[..., 3, H, W] RGB in [0, 1] -> HSV with H in [0, 1) (fraction of the colour wheel)."""
    r, g, b = x.unbind(dim=-3)
    v, argmax = x.max(dim=-3)
    chroma = v - x.min(dim=-3).values
    gray = chroma == 0
    safe_c = torch.where(gray, torch.ones_like(chroma), chroma)
    # Hue sector in units of 60 degrees, measured from the channel that holds the maximum.
    sector = torch.where(argmax == 0, (g - b) / safe_c,
                         torch.where(argmax == 1, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
    h = torch.where(gray, torch.zeros_like(sector), torch.remainder(sector / 6.0, 1.0))
    s = torch.where(v > 0, chroma / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([h, s, v], dim=-3)


def hsv_to_rgb(hsv):
    """Inverse of ``rgb_to_hsv``: channel n in (5, 3, 1) for (R, G, B) is v - v*s*clip(min(k, 4-k), 0, 1)
    with k = (n + 6h) mod 6."""
    h, s, v = hsv.unbind(dim=-3)
    n = torch.arange(5.0, 0.0, -2.0, device=hsv.device, dtype=hsv.dtype).view(3, 1, 1)  # 5, 3, 1; no host copy
    k = torch.remainder(n + 6.0 * h.unsqueeze(-3), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v.unsqueeze(-3) * (1.0 - s.unsqueeze(-3) * ramp)


def adjust_hue(x, shift):
    """Rotate hue by ``shift`` (in [-0.5, 0.5], a fraction of the colour wheel)."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[..., 0, :, :] + _per_sample(shift, x).squeeze(-3), 1.0)
    return hsv_to_rgb(torch.cat([h.unsqueeze(-3), hsv[..., 1:, :, :]], dim=-3)).clamp_(0.0, 1.0)


def solarize(x, threshold):
    """Invert pixels ``>= threshold``; a threshold above 1 leaves [0, 1] images unchanged, and a threshold
    of exactly 1 leaves [0, 1) unchanged (only pixels equal to 1 flip to 0, as in torchvision)."""
    return torch.where(x >= threshold, 1.0 - x, x)
