"""Decode an image file (or its bytes) with PIL into uint8 RGB, cropping before anything is resized.

The training view is decoded, cropped and resized in one pass:

1. the JPEG/PNG header gives the size without decoding;
2. the crop box is drawn from the same generator and distribution as ``transforms.random_resized_crop_flip``
   (``sample_crop_box``, then the flip), so a crop is still keyed by (seed, epoch, index);
3. a JPEG whose crop is at least twice the output size on both sides is decoded at 1/2, 1/4 or 1/8 scale in
   the DCT (PIL's ``draft``; libjpeg-turbo's scaled IDCT), the crop box scaled with it;
4. only the crop's pixels are copied out of PIL, and resized by torch's uint8 antialiased bilinear kernel
   (the same triangle filter as the float path it replaces, within one grey level, and SIMD on x86).

Images that cannot be used give None and an ``UnreadableImageWarning`` naming the file: decode errors,
images of more than ``max_pixels`` pixels (decompression bombs: checked from the header, before decoding),
unusable shapes. 16-bit images (PIL modes ``I;16*``, ``I``) are scaled to 8 bits, not clipped.
"""
import io
import os
import warnings

import numpy as np
import torch

from ..transforms.geometry import resize_hwc_uint8, sample_crop_box

# Pixels (width x height) above which an image is skipped unread. 64 megapixels holds every photo of today's
# cameras (a 61 MP full-frame sensor is 9504 x 6336) while an RGB decode stays below 200 MB per worker; the
# 12000 x 12000 one-bit PNG of 17 KB that PIL's own limit (89 MP warns, 179 MP refuses) lets through is not.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and its sample was skipped."""


class _Unusable(Exception):
    """An image that decodes but must be skipped (too many pixels, no pixels)."""


def _name(source):
    return getattr(source, "name", None) or (source if isinstance(source, str) else "<bytes>")


def _open(source, max_pixels):
    """A lazily decoded PIL image; its header has been read and its size checked against ``max_pixels``."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:  # one read: PIL's own small reads from a file cost ~10 % more
            source = io.BytesIO(f.read())
    elif isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    im = Image.open(source)
    w, h = im.size
    if w < 1 or h < 1:
        im.close()
        raise _Unusable(f"it has no pixels ({w}x{h})")
    if max_pixels and w * h > max_pixels:
        im.close()
        raise _Unusable(f"{w}x{h} = {w * h / 1e6:.1f} megapixels is over data.max_image_pixels = "
                        f"{max_pixels / 1e6:g} megapixels (a decompression bomb, or raise the limit)")
    return im


def _rgb(im):
    """``im`` as an 8-bit RGB PIL image; 16-bit grey is scaled by 255/65535 (PIL's convert would clip it)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(im).astype(np.float32)
        a = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "F":  # float images: taken as [0, 1]
        a = np.clip(np.rint(np.asarray(im, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")


def _warn(source, err):
    reason = str(err) if isinstance(err, _Unusable) else f"{type(err).__name__}: {err}"
    warnings.warn(f"skipping unreadable image {_name(source)}: {reason}", UnreadableImageWarning, stacklevel=3)


def _hwc(im):
    """A uint8 [H, W, 3] tensor of an RGB PIL image: one copy (PIL's packed bytes), read-only.

    ``np.array`` would copy those bytes once more; the tensor is only read (by the resize) or copied.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(im))


def decode_image(source, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """The whole image as uint8 [3, H, W] RGB, or None (with a warning) when it cannot be used.

    ``source`` is a path, a binary file object or the file's bytes.
    """
    try:
        with _open(source, max_pixels) as im:
            hwc = _hwc(_rgb(im))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        _warn(source, err)
        return None
    return hwc.permute(2, 0, 1).contiguous()  # a writable copy


def draft_factor(crop_h, crop_w, out_h, out_w):
    """The largest JPEG DCT scale-down (1, 2, 4 or 8) that leaves the crop at least ``out`` on both sides.

    So the scaled decode only replaces part of a downscale that happens anyway; it never upsamples.
    """
    f = 1
    while f < 8 and crop_h >= 2 * f * out_h and crop_w >= 2 * f * out_w:
        f *= 2
    return f


def _crop_resize(im, box, out, use_draft):
    """Crop ``box`` = (top, left, h, w) in full-size pixels from the lazily decoded ``im``; resize to ``out``."""
    top, left, h, w = box
    W, H = im.size
    f = draft_factor(h, w, out[0], out[1]) if use_draft and im.format == "JPEG" else 1
    if f > 1:
        im.draft("RGB", (-(-W // f), -(-H // f)))  # PIL picks the scale giving at least this size
        sx, sy = im.size[0] / W, im.size[1] / H
        l2, t2 = int(round(left * sx)), int(round(top * sy))
        r2, b2 = max(l2 + 1, min(im.size[0], int(round((left + w) * sx)))), \
            max(t2 + 1, min(im.size[1], int(round((top + h) * sy))))
        left, top, w, h = l2, t2, r2 - l2, b2 - t2
    region = _rgb(im).crop((left, top, left + w, top + h))
    return resize_hwc_uint8(_hwc(region), out)


def decode_random_crop(source, out_size, *, scale, ratio=(3 / 4, 4 / 3), generator=None, flip_p=0.5,
                       max_pixels=DEFAULT_MAX_IMAGE_PIXELS, draft=True):
    """Decode, random resized crop and flip in one pass: uint8 [3, oh, ow], or None (with a warning).

    The box and the flip are the draws of ``random_resized_crop_flip`` from the same ``generator``.
    ``draft=False`` always decodes at full size (the reference for the scaled decode's quality test).
    """
    out = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    try:
        with _open(source, max_pixels) as im:
            W, H = im.size
            box = sample_crop_box(H, W, scale, ratio, generator)
            flip = torch.rand(1, generator=generator, dtype=torch.float64).item() < flip_p
            img = _crop_resize(im, box, out, draft)
    except Exception as err:
        _warn(source, err)
        return None
    return img.flip(-1) if flip else img


def decode_center_crop(source, out_size, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, draft=True):
    """The evaluation view: the largest centred crop with the output's aspect, resized; or None."""
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    try:
        with _open(source, max_pixels) as im:
            W, H = im.size
            ch, cw = (H, max(1, round(H * ow / oh))) if W * oh >= H * ow else (max(1, round(W * oh / ow)), W)
            return _crop_resize(im, ((H - ch) // 2, (W - cw) // 2, ch, cw), (oh, ow), draft)
    except Exception as err:
        _warn(source, err)
        return None
