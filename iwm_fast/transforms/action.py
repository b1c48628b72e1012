"""The action vector a(x -> y) that conditions IWM's predictor.

Layout (``ACTION_DIM`` = 14 float32 entries per sample; identity transform = all zeros):

====  ========================  ===============================================
 idx  name                      value
====  ========================  ===============================================
  0   source_jitter             1 if the source view was colour-jittered, else 0
  1   source_brightness         brightness factor - 1
  2   source_contrast           contrast factor - 1
  3   source_saturation         saturation factor - 1
  4   source_hue                hue shift (fraction of the colour wheel)
  5   target_jitter             1 if the target view was colour-jittered, else 0
  6   target_brightness         brightness factor - 1
  7   target_contrast           contrast factor - 1
  8   target_saturation         saturation factor - 1
  9   target_hue                hue shift
 10   grayscale                 1 if the source was turned to grayscale
 11   blur                      1 if the source was blurred
 12   blur_sigma                Gaussian sigma in pixels, 0 when not blurred
 13   solarize                  1 if the source was solarized
====  ========================  ===============================================

Factors of a view whose jitter was not applied are the identity (so entries 1-4 / 6-9 are 0). The four
jitter operations always run in the fixed order brightness, contrast, saturation, hue (torchvision's
``ColorJitter`` draws a random order per image; a fixed order keeps the action a complete description of
the transformation without encoding a permutation). The source-only transforms run after the source's
jitter in the order grayscale, blur, solarize.
"""
import torch

from .params import TransformParams

ACTION_LAYOUT = (
    "source_jitter", "source_brightness", "source_contrast", "source_saturation", "source_hue",
    "target_jitter", "target_brightness", "target_contrast", "target_saturation", "target_hue",
    "grayscale", "blur", "blur_sigma", "solarize",
)
ACTION_DIM = len(ACTION_LAYOUT)


def _view_columns(j):
    return [j.applied.float(), j.brightness - 1.0, j.contrast - 1.0, j.saturation - 1.0, j.hue.float()]


def action_vector(params: TransformParams) -> torch.Tensor:
    """``[B, ACTION_DIM]`` float32 on the parameters' device, in the order of ``ACTION_LAYOUT``."""
    if not isinstance(params, TransformParams):
        raise TypeError(f"params must be TransformParams, got {type(params).__name__}")
    cols = (_view_columns(params.source) + _view_columns(params.target)
            + [params.grayscale.float(), params.blur.float(), params.blur_sigma.float(), params.solarize.float()])
    return torch.stack([c.float() for c in cols], dim=1)
