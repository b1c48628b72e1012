"""IWM's image transformations: a shared crop and flip (CPU, DataLoader workers), then per-view photometric
transforms applied batched on the training device from explicit, seeded per-sample parameters.

Typical step::

    params = sample_params(B, cfg=cfg, seed=seed, step=step, device=device)
    x = to_float(batch["images"].to(device))            # shared crop, uint8 -> [0, 1]
    source, target = apply(x, params, "source"), apply(x, params, "target")
    action = action_vector(params)                       # [B, ACTION_DIM], layout in iwm_fast.transforms.action
    source, target = normalize(source), normalize(target)

With several ranks, sample the global batch and take ``params[rank::world_size]`` (the data sampler deals
samples to ranks in that strided order), so one process and N processes see the same views.
"""
from .action import ACTION_DIM, ACTION_LAYOUT, action_vector
from .config import TransformConfig
from .geometry import center_crop_resize, random_resized_crop_flip, resize, sample_crop_box
from .params import JitterParams, TransformParams, sample_params
from .seeding import derive_seed, generator
from .views import IMAGENET_MEAN, IMAGENET_STD, VIEWS, apply, check_images, color_jitter, normalize, to_float

__all__ = [
    "ACTION_DIM", "ACTION_LAYOUT", "action_vector", "TransformConfig", "TransformParams", "JitterParams",
    "sample_params", "apply", "normalize", "to_float", "check_images", "color_jitter", "random_resized_crop_flip",
    "resize", "center_crop_resize", "sample_crop_box", "derive_seed", "generator", "IMAGENET_MEAN", "IMAGENET_STD",
    "VIEWS",
]
