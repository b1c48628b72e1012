"""The crop and flip shared by both views; CPU, one image at a time (it runs in DataLoader workers)."""
import math

import torch
import torch.nn.functional as F


def _size_pair(out_size):
    if isinstance(out_size, int) and not isinstance(out_size, bool):
        out_size = (out_size, out_size)
    if (not isinstance(out_size, (tuple, list)) or len(out_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in out_size)):
        raise ValueError(f"out_size must be a positive int or a pair of them, got {out_size!r}")
    return tuple(out_size)


def _check_image(img):
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}")
    if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        raise ValueError(f"img must have shape [3, H, W], got {tuple(img.shape)}")
    if img.dtype != torch.uint8 and not img.is_floating_point():
        raise TypeError(f"img must be uint8 or floating point, got {img.dtype}")


def _check_range(name, r):
    if (not isinstance(r, (tuple, list)) or len(r) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
            or not 0 < r[0] <= r[1] < math.inf):
        raise ValueError(f"{name} must be a pair (lo, hi) with 0 < lo <= hi, got {r!r}")


def resize(img, out_size):
    """Bilinear resize with antialiasing of [3, H, W]; uint8 stays uint8 (rounded), floats stay floats."""
    out = _size_pair(out_size)
    _check_image(img)
    if tuple(img.shape[1:]) == out:
        return img.clone()
    y = F.interpolate(img[None].float(), size=out, mode="bilinear", align_corners=False, antialias=True)[0]
    if img.dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.to(img.dtype)


def resize_hwc_uint8(hwc, out_size):
    """uint8 [H, W, 3] (as PIL lays pixels out) -> uint8 [3, oh, ow] contiguous, bilinear with antialiasing.

    Torch's uint8 kernel reads the channels-last view without a copy and runs vectorised on x86 (AVX2); it
    applies the same triangle filter as ``resize`` (float, rounded) and agrees with it within one grey level.
    """
    oh, ow = _size_pair(out_size)
    if not isinstance(hwc, torch.Tensor) or hwc.dtype != torch.uint8 or hwc.dim() != 3 or hwc.shape[2] != 3:
        raise ValueError(f"hwc must be a uint8 [H, W, 3] tensor, got {getattr(hwc, 'shape', type(hwc))}")
    x = hwc.permute(2, 0, 1)[None]
    if tuple(hwc.shape[:2]) == (oh, ow):
        return x[0].clone(memory_format=torch.contiguous_format)
    y = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)[0]
    return y.contiguous()


def center_crop_resize(img, out_size):
    """The largest centred crop with the output's aspect, resized to ``out_size`` (the evaluation view)."""
    oh, ow = _size_pair(out_size)
    _check_image(img)
    H, W = img.shape[1:]
    ch, cw = (H, max(1, round(H * ow / oh))) if W * oh >= H * ow else (max(1, round(W * oh / ow)), W)
    top, left = (H - ch) // 2, (W - cw) // 2
    return resize(img[:, top:top + ch, left:left + cw], (oh, ow))


def sample_crop_box(height, width, scale, ratio, generator=None):
    """(top, left, h, w) of a box covering ``scale`` of the area with aspect (w/h) in ``ratio``, log-uniform.

    Ten tries are made; if none fits, the largest centred box with an admissible aspect is returned.
    """
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(lo + (hi - lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif aspect > ratio[1]:
        h, w = height, max(1, int(round(height * ratio[1])))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(img, out_size, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
                             flip_p=0.5):
    """Random resized crop (I-JEPA's scale range 0.3-1.0) then horizontal flip with probability ``flip_p``.

    ``img`` is uint8 or float [3, H, W]; the result keeps its dtype. The same ``generator`` state gives the
    same crop; pass a generator keyed by (seed, epoch, index) for runs that resume exactly.
    """
    _check_image(img)
    out = _size_pair(out_size)
    _check_range("scale", scale)
    _check_range("ratio", ratio)
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p!r}")
    top, left, h, w = sample_crop_box(img.shape[1], img.shape[2], scale, ratio, generator)
    flip = torch.rand(1, generator=generator, dtype=torch.float64).item() < flip_p
    crop = resize(img[:, top:top + h, left:left + w], out)
    return crop.flip(-1) if flip else crop
