"""User data: JPEG/PNG files in class subfolders, decoded and cropped with PIL in DataLoader workers."""
import os
import warnings

from torch.utils.data import Dataset

from ..transforms.seeding import generator
from .decode import DEFAULT_MAX_IMAGE_PIXELS, UnreadableImageWarning, decode_center_crop, decode_random_crop
from .decode import decode_image  # noqa: F401  (re-exported: iwm_fast.data.decode_image)
from .sampler import split_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class SkippedLinkWarning(UserWarning):
    """A directory link under an ImageFolder root was not followed (a loop, a duplicate, or out of place)."""


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_class(class_dir, root_real, visited, exts):
    """Image files under ``class_dir`` in ``os.walk`` order (a folder's files by name, then its subfolders by
    name), each real directory visited once.

    A directory link is followed only to a directory inside this class folder's real tree not visited yet:
    a link out of the root, into another class (which would mislabel its images), to the root or an
    ancestor (a loop), or to a directory already walked (a duplicate) is skipped with a warning. File links
    are read as files: they cannot loop.
    """
    class_real = os.path.realpath(class_dir)
    files, stack = [], [class_dir]
    visited.add(class_real)
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            warnings.warn(f"skipping unreadable directory {d}: {err}", SkippedLinkWarning, stacklevel=3)
            continue
        subdirs = []
        for e in entries:
            if e.is_dir(follow_symlinks=True):
                real = os.path.realpath(e.path)
                why = None
                if e.is_symlink() and not (_inside(real, class_real) and real != class_real):
                    why = ("it points out of the data root" if not _inside(real, root_real) else
                           "it points to the root, an ancestor or another class (a loop or mislabelled images)")
                if why is None and real in visited:
                    why = "its directory is already read (a loop or a duplicate)"
                if why is not None:
                    if e.is_symlink():  # a real directory seen before was read through a link to it
                        warnings.warn(f"not following directory link {e.path} -> {real}: {why}",
                                      SkippedLinkWarning, stacklevel=3)
                    continue
                visited.add(real)
                subdirs.append(e.path)
            elif e.name.lower().endswith(exts) and not e.name.startswith("."):
                files.append(e.path)
        stack.extend(reversed(subdirs))  # top-down, in name order: os.walk's order, so sample indices keep
    return files


def class_folders(root):
    """The class folder names of an ImageFolder ``root``, sorted: its visible subfolders, less links to the
    root or an ancestor (a loop; skipped with a warning)."""
    root_real = os.path.realpath(root)
    classes = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name.startswith(".") or not e.is_dir():
            continue
        if e.is_symlink() and _inside(root_real, os.path.realpath(e.path)):
            warnings.warn(f"not following class folder link {e.path}: it points to the data root or an "
                          "ancestor (a loop)", SkippedLinkWarning, stacklevel=3)
            continue
        classes.append(e.name)
    return classes


def has_images(root, classes, extensions=IMAGE_EXTENSIONS):
    """Whether any class folder holds an image file (walking the classes in turn until one does)."""
    root_real, visited = os.path.realpath(root), {os.path.realpath(root)}
    exts = tuple(e.lower() for e in extensions)
    return any(_walk_class(os.path.join(root, name), root_real, visited, exts) for name in classes)


class ImageFolder(Dataset):
    """``root/<class>/**/*.{jpg,jpeg,png}``; labels are the sorted class-folder names' positions.

    Items are ``(image uint8 [3, S, S], label, index)``, or None for a file that cannot be decoded (a
    warning names it; ``collate_skip_bad`` drops it and counts it in the batch's ``num_skipped``).
    ``crop=True``: random resized crop and flip keyed by ``(seed, epoch, index)``, decoded and cropped in one
    pass (``data.decode``); ``crop=False``: the largest centred square, resized (evaluation).
    Images over ``max_image_pixels`` pixels are skipped unread (0: no limit). Class folders may be links;
    directory links inside them are followed only within the class (see ``_walk_class``).
    """

    def __init__(self, root, image_size, crop=True, seed=0, crop_scale=(0.3, 1.0), extensions=IMAGE_EXTENSIONS,
                 max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be an int >= 0 (0: no limit), got {max_image_pixels!r}")
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"ImageFolder root {root!r} does not exist")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"ImageFolder root {root!r} is not a directory")
        root_real = os.path.realpath(root)
        classes = class_folders(root)
        if not classes:
            raise ValueError(f"ImageFolder root {root!r} has no class subfolders (expected root/<class>/<image>)")
        exts = tuple(e.lower() for e in extensions)
        visited = {root_real}
        samples = []
        for label, name in enumerate(classes):
            samples += [(p, label) for p in _walk_class(os.path.join(root, name), root_real, visited, exts)]
        if not samples:
            raise ValueError(f"ImageFolder root {root!r} holds no image files with extensions {exts} "
                             f"in its {len(classes)} class folders")
        self.root, self.classes, self.samples = root, tuple(classes), samples
        self.num_classes = len(classes)
        self.image_size, self.crop, self.seed, self.crop_scale = image_size, bool(crop), int(seed), tuple(crop_scale)
        self.max_image_pixels = max_image_pixels

    decode_on_gpu = False  # set by iwm_fast.data.gpu_decode.enable: items then carry JPEG bytes and the crop

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = split_key(key, len(self))
        path, label = self.samples[index]
        if self.crop and self.decode_on_gpu:
            img = _read_for_gpu(path, self.image_size, self.crop_scale, generator(self.seed, epoch, index),
                                self.max_image_pixels)
        elif self.crop:
            img = decode_random_crop(path, self.image_size, scale=self.crop_scale,
                                     generator=generator(self.seed, epoch, index), max_pixels=self.max_image_pixels)
        else:
            img = decode_center_crop(path, self.image_size, max_pixels=self.max_image_pixels)
        if img is None:
            return None
        return img, label, index


def _read_for_gpu(path, size, scale, gen, max_pixels):
    from .gpu_decode import crop_for_gpu

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", UnreadableImageWarning,
                      stacklevel=3)
        return None
    return crop_for_gpu(data, path, (size, size), scale=scale, generator=gen, max_pixels=max_pixels)


__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "SkippedLinkWarning", "UnreadableImageWarning"]
