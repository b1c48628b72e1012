"""Apply sampled parameters to a batch of images on the images' device, and ImageNet normalisation."""
import torch

from .blur import gaussian_blur
from .color import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, grayscale, solarize
from .params import JitterParams, TransformParams

VIEWS = ("source", "target")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images, *, check_range=True, name="images"):
    """Raise a clear error unless ``images`` is a float [B, 3, H, W] tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{name} must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point with values in [0, 1], got {images.dtype}; "
                        "convert uint8 images with iwm_fast.transforms.to_float")
    if check_range and images.numel() and bool(((images < 0) | (images > 1) | images.isnan()).any()):
        lo, hi = images.min().item(), images.max().item()
        raise ValueError(f"{name} must have values in [0, 1] (no NaN), got min {lo:g}, max {hi:g}")


def to_float(images, dtype=torch.float32):
    """uint8 [0, 255] -> ``dtype`` in [0, 1]; floating images are only cast."""
    if images.dtype == torch.uint8:
        return images.to(dtype).div_(255.0)
    if images.is_floating_point():
        return images.to(dtype)
    raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")


def color_jitter(x, jp: JitterParams):
    """Brightness, contrast, saturation, hue in that fixed order; samples not jittered are returned as is."""
    y = adjust_brightness(x, jp.brightness)
    y = adjust_contrast(y, jp.contrast)
    y = adjust_saturation(y, jp.saturation)
    y = adjust_hue(y, jp.hue)
    return torch.where(jp.applied.view(-1, 1, 1, 1), y, x)


def apply(images, params: TransformParams, view: str, *, check_range: bool = True):
    """The ``view`` ("source" or "target") of a batch of shared crops ``images`` (float [B, 3, H, W] in [0, 1]).

    The target gets its colour jitter; the source gets its own jitter, then grayscale, Gaussian blur and
    solarize where its flags say so. Runs on the images' device; the result has the images' dtype
    (the arithmetic is float32). ``check_range=False`` skips the value check, which costs one host sync.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if not isinstance(params, TransformParams):
        raise TypeError(f"params must be TransformParams, got {type(params).__name__}")
    check_images(images, check_range=check_range)
    if params.batch_size != images.shape[0]:
        raise ValueError(f"params hold {params.batch_size} samples but images hold {images.shape[0]}")
    if params.device != images.device:
        params = params.to(images.device, non_blocking=True)
    if images.shape[0] == 0:  # every file of a batch may have been unreadable
        return images.clone()
    x = images.float()
    if view == "target":
        return color_jitter(x, params.target).to(images.dtype)
    x = color_jitter(x, params.source)
    x = torch.where(params.grayscale.view(-1, 1, 1, 1), grayscale(x), x)
    x = gaussian_blur(x, params.blur_sigma, params.blur_radius)
    x = torch.where(params.solarize.view(-1, 1, 1, 1), solarize(x, params.solarize_threshold), x)
    return x.to(images.dtype)


def normalize(images):
    """ImageNet mean/std normalisation of [..., 3, H, W] images in [0, 1] (after the transforms, before the
    encoder)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("normalize expects a floating point tensor in [0, 1]")
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W], got {tuple(images.shape)}")
    mean, std = _mean_std(images.device, images.dtype)
    return (images - mean) / std


_MEAN_STD = {}


def _mean_std(device, dtype):
    # Cached per device: making them from Python lists every step would be a blocking host-to-device copy.
    key = (device, dtype)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = tuple(torch.tensor(v, dtype=dtype).view(3, 1, 1).to(device)
                               for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _MEAN_STD[key]
