"""User data: JPEG/PNG files in class subfolders, decoded with PIL in DataLoader workers."""
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from ..transforms.geometry import center_crop_resize, random_resized_crop_flip
from ..transforms.seeding import generator
from .sampler import split_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and its sample was skipped."""


def decode_image(path):
    """uint8 [3, H, W] RGB, or None (with a warning) when the file cannot be read or decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", UnreadableImageWarning,
                      stacklevel=2)
        return None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        warnings.warn(f"skipping image {path} with unusable shape {arr.shape}", UnreadableImageWarning, stacklevel=2)
        return None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """``root/<class>/**/*.{jpg,jpeg,png}``; labels are the sorted class-folder names' positions.

    Items are ``(image uint8 [3, S, S], label, index)``, or None for a file that cannot be decoded (a
    warning names it; ``collate_skip_bad`` drops it and counts it in the batch's ``num_skipped``).
    ``crop=True``: random resized crop and flip keyed by ``(seed, epoch, index)``; ``crop=False``: the
    largest centred square, resized (evaluation).
    """

    def __init__(self, root, image_size, crop=True, seed=0, crop_scale=(0.3, 1.0), extensions=IMAGE_EXTENSIONS):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"ImageFolder root {root!r} does not exist")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"ImageFolder root {root!r} is not a directory")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"ImageFolder root {root!r} has no class subfolders (expected root/<class>/<image>)")
        exts = tuple(e.lower() for e in extensions)
        samples = []
        for label, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
                dirnames.sort()
                samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                            if f.lower().endswith(exts) and not f.startswith(".")]
        if not samples:
            raise ValueError(f"ImageFolder root {root!r} holds no image files with extensions {exts} "
                             f"in its {len(classes)} class folders")
        self.root, self.classes, self.samples = root, tuple(classes), samples
        self.num_classes = len(classes)
        self.image_size, self.crop, self.seed, self.crop_scale = image_size, bool(crop), int(seed), tuple(crop_scale)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = split_key(key, len(self))
        path, label = self.samples[index]
        img = decode_image(path)
        if img is None:
            return None
        if self.crop:
            img = random_resized_crop_flip(img, self.image_size, scale=self.crop_scale,
                                           generator=generator(self.seed, epoch, index))
        else:
            img = center_crop_resize(img, self.image_size)
        return img, label, index
