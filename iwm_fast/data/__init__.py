"""Data: the bundled digits dataset, an ImageFolder reader, a resumable distributed sampler and the loader.

Batches are dicts ``{"images": uint8 [B, 3, S, S], "labels": int64 [B], "indices": int64 [B], "batch_positions",
"num_skipped": int}``; the shared crop and flip are done in DataLoader workers, the photometric transforms
later on the training device (``iwm_fast.transforms``). From the training loaders (``build_loader``,
``ShardLoader``), ``num_skipped`` counts unreadable files met for the first time (by any rank), so its sum over
batches and ranks is the number of distinct unreadable files; ``collate_skip_bad`` alone counts drops.
Datasets are chosen by name in ``registry`` (the names alone, light to import, in ``choices``); the names below
are imported on first use.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "collate_skip_bad": "collate", "BundledDigits": "digits", "render_digits": "digits",
    **dict.fromkeys(("DEFAULT_MAX_IMAGE_PIXELS", "UnreadableImageWarning", "decode_center_crop", "decode_image",
                     "decode_random_crop"), "decode"),
    **dict.fromkeys(("IMAGE_EXTENSIONS", "ImageFolder", "SkippedLinkWarning"), "folder"),
    "ResumableLoader": "loader", "build_loader": "loader", "ResumableSampler": "sampler", "split_key": "sampler",
    "ShardDataset": "shards", "ShardLoader": "shards",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
