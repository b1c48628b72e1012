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
Names are imported on first use, so that ``config`` (the run config's ``augment`` section) is light to import.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "ACTION_DIM": "action", "ACTION_LAYOUT": "action", "action_vector": "action", "TransformConfig": "config",
    **dict.fromkeys(("center_crop_resize", "random_resized_crop_flip", "resize", "sample_crop_box"), "geometry"),
    **dict.fromkeys(("JitterParams", "TransformParams", "sample_params"), "params"),
    "derive_seed": "seeding", "generator": "seeding",
    **dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "VIEWS", "apply", "check_images", "color_jitter", "normalize",
                     "to_float"), "views"),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
