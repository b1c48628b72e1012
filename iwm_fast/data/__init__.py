"""Data: the bundled digits dataset, an ImageFolder reader, a resumable distributed sampler and the loader.

Batches are dicts ``{"images": uint8 [B, 3, S, S], "labels": int64 [B], "indices": int64 [B], "batch_positions",
"num_skipped": int}``; the shared crop and flip are done in DataLoader workers, the photometric transforms
later on the training device (``iwm_fast.transforms``).
"""
from .collate import collate_skip_bad
from .digits import BundledDigits, render_digits
from .decode import (DEFAULT_MAX_IMAGE_PIXELS, UnreadableImageWarning, decode_center_crop, decode_image,
                     decode_random_crop)
from .folder import IMAGE_EXTENSIONS, ImageFolder, SkippedLinkWarning
from .loader import ResumableLoader, build_loader
from .sampler import ResumableSampler, split_key

__all__ = ["BundledDigits", "ImageFolder", "ResumableSampler", "ResumableLoader", "build_loader",
           "collate_skip_bad", "decode_image", "render_digits", "split_key", "UnreadableImageWarning",
           "IMAGE_EXTENSIONS", "DEFAULT_MAX_IMAGE_PIXELS", "SkippedLinkWarning", "decode_center_crop",
           "decode_random_crop"]
