"""Data: the bundled digits dataset, an ImageFolder reader, a resumable distributed sampler and the loader.

Batches are dicts ``{"images": uint8 [B, 3, S, S], "labels": int64 [B], "indices": int64 [B], "batch_positions",
"num_skipped": int}``; the shared crop and flip are done in DataLoader workers, the photometric transforms
later on the training device (``iwm_fast.transforms``). From the training loaders (``build_loader``,
``ShardLoader``), ``num_skipped`` counts unreadable files met for the first time (by any rank), so its sum over
batches and ranks is the number of distinct unreadable files; ``collate_skip_bad`` alone counts drops.
Datasets are chosen by name in ``registry``.
"""
from .collate import collate_skip_bad
from .digits import BundledDigits, render_digits
from .decode import (DEFAULT_MAX_IMAGE_PIXELS, UnreadableImageWarning, decode_center_crop, decode_image,
                     decode_random_crop)
from .folder import IMAGE_EXTENSIONS, ImageFolder, SkippedLinkWarning
from .loader import ResumableLoader, build_loader
from .sampler import ResumableSampler, split_key
from .shards import ShardDataset, ShardLoader

__all__ = ["BundledDigits", "ImageFolder", "ResumableSampler", "ResumableLoader", "build_loader",
           "collate_skip_bad", "decode_image", "render_digits", "split_key", "UnreadableImageWarning",
           "IMAGE_EXTENSIONS", "DEFAULT_MAX_IMAGE_PIXELS", "ShardDataset", "ShardLoader", "SkippedLinkWarning",
           "decode_center_crop", "decode_random_crop"]
