"""The pixel baseline: the images themselves as probe features, so a probe on learned features has an input to
beat (on small images a linear probe on pixels can beat a short pretraining's features)."""
import torch
import torch.nn.functional as F

from .features import as_float_images

# Larger images are average-pooled to this side: a 224-pixel image would give 150k features per image and a
# float64 probe of tens of GB; at 32 it is 3072, and images of 32 pixels or fewer are used as they are.
MAX_SIDE = 32


@torch.no_grad()
def pixel_features(images, max_side=MAX_SIDE):
    """Images [N, 3, H, W] (uint8, or float in [0, 1]) as flat float32 features [N, 3*h*w] on the CPU, with
    h, w at most ``max_side`` (area pooling). The probe standardises each feature as it does an encoder's."""
    x = as_float_images(images).float()
    h, w = min(x.shape[2], max_side), min(x.shape[3], max_side)
    if (h, w) != tuple(x.shape[2:]):
        x = F.adaptive_avg_pool2d(x, (h, w))
    return x.flatten(1).cpu()
