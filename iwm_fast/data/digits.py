"""The bundled dataset: scikit-learn's handwritten digits rendered as small colour images (no download)."""
import colorsys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..transforms.geometry import random_resized_crop_flip
from ..transforms.seeding import generator
from .sampler import split_key

SPLITS = ("train", "val")
_SPLIT_SEED = 20240304   # fixes the train/val split once for all runs
_COLOUR_SEED = 1797      # fixes each image's colours once for all runs
VAL_EVERY = 6            # every 6th image of each class (in a fixed shuffled order) is validation


def _split_indices(labels):
    """Stratified split: within each class, a fixed shuffled order, every ``VAL_EVERY``-th to val."""
    rng = np.random.default_rng(_SPLIT_SEED)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        val[members[::VAL_EVERY]] = True
    idx = np.arange(len(labels))
    return {"train": idx[~val], "val": idx[val]}


def _colour_pair(index):
    """Foreground and background RGB for digit ``index``: bright ink of a random hue on dark paper of another hue.

    The polarity is the same for every image (ink brighter than paper), so the digit's shape, not its colour
    scheme, is what separates the classes; the hues and saturations vary per image, so every image has real
    colour for the colour-jitter actions to change.
    """
    rng = np.random.default_rng([_COLOUR_SEED, int(index)])
    u = rng.random(6)
    h_fg = u[0]
    h_bg = (h_fg + 0.25 + 0.5 * u[1]) % 1.0
    fg = colorsys.hsv_to_rgb(h_fg, 0.4 + 0.6 * u[2], 0.7 + 0.3 * u[3])
    bg = colorsys.hsv_to_rgb(h_bg, 0.5 + 0.5 * u[4], 0.1 + 0.25 * u[5])
    return fg, bg


def render_digits(images, indices, image_size):
    """[N, 8, 8] intensities 0..16 -> uint8 [N, 3, S, S]: bilinear upscale, then ink/paper colours."""
    ink = torch.as_tensor(images, dtype=torch.float32)[:, None] / 16.0
    ink = F.interpolate(ink, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    pairs = [_colour_pair(i) for i in indices]
    fg = torch.tensor([p[0] for p in pairs], dtype=torch.float32)[:, :, None, None]
    bg = torch.tensor([p[1] for p in pairs], dtype=torch.float32)[:, :, None, None]
    rgb = bg + (fg - bg) * ink
    return (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8)


class BundledDigits(Dataset):
    """scikit-learn's 1797 8x8 digits (10 classes) as colour ``image_size`` images; 1493 train, 304 val.

    Items are ``(image uint8 [3, S, S], label, index)``. With ``crop=True`` each item is a random resized
    crop and flip keyed by ``(seed, epoch, index)``; keys may be ``index`` or ``(epoch, index)``.
    The split and the colours are fixed by the dataset, not by ``seed``.
    """

    classes = tuple(str(d) for d in range(10))
    num_classes = 10

    def __init__(self, split="train", image_size=32, crop=True, seed=0, crop_scale=(0.3, 1.0)):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        labels = np.asarray(digits.target)
        self.source_indices = _split_indices(labels)[split]
        self.split, self.image_size, self.crop, self.seed = split, image_size, bool(crop), int(seed)
        self.crop_scale = tuple(crop_scale)
        self.images = render_digits(digits.images[self.source_indices], self.source_indices, image_size)
        self.labels = torch.as_tensor(labels[self.source_indices], dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        epoch, index = split_key(key, len(self))
        img = self.images[index]
        if self.crop:
            img = random_resized_crop_flip(img, self.image_size, scale=self.crop_scale,
                                           generator=generator(self.seed, epoch, index))
        return img, int(self.labels[index]), index
