"""``data.dataset`` names -> how to build the training set, its resumable loader and its evaluation split.

The engine (``train.data.BatchStream``) and the evaluation (``train.evaluate``) both look datasets up here,
so a new source is one ``register`` call. Registered: ``digits``, ``imagefolder``, ``shards``.
"""
from dataclasses import dataclass
from collections.abc import Callable

import torch

from .choices import DATASETS, add_dataset_name

_REGISTRY = {}


@dataclass(frozen=True)
class DatasetSpec:
    """Each receives the ``data`` config section and the values it needs, not the whole config:
    ``build(data, *, seed, split, crop, rank, world_size)`` -> dataset; ``loader(dataset, data, *, seed,
    batch_size, rank, world_size, start_state)`` -> an iterable of batches (each pass the rest of an epoch) with
    ``state_dict()``; ``eval_split(data, *, seed, max_images)`` -> ``((train_images, train_labels), (val_images,
    val_labels))`` of at most ``max_images`` evaluation views."""
    name: str
    build: Callable
    loader: Callable
    eval_split: Callable


def register(name, *, build, eval_split, loader=None):
    if name in _REGISTRY:
        raise ValueError(f"data.dataset {name!r} is already registered")
    _REGISTRY[name] = DatasetSpec(name, build, loader or map_style_loader, eval_split)
    add_dataset_name(name)


def names():
    return tuple(_REGISTRY)


def get(name):
    if name not in _REGISTRY:
        raise ValueError(f"unknown data.dataset {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def map_style_loader(dataset, data, *, seed, batch_size, rank, world_size, start_state=None):
    """A ``ResumableLoader`` over a map-style dataset (sample keys from a ``ResumableSampler``)."""
    from .loader import build_loader

    loader, _ = build_loader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed,
                             num_workers=data.num_workers, start_state=start_state)
    return loader


def images_and_labels(items):
    """Stack ``(image, label, ...)`` items, leaving out unreadable ones (None)."""
    images, labels = [], []
    for item in items:
        if item is not None:
            images.append(torch.as_tensor(item[0]))
            labels.append(int(item[1]))
    if not images:
        raise RuntimeError("no readable images to evaluate on")
    return torch.stack(images), torch.tensor(labels)


# ----- digits -----

def _digits(data, *, seed, split="train", crop=True, rank=0, world_size=1):
    from .digits import BundledDigits

    return BundledDigits(split=split, image_size=data.image_size, crop=crop, seed=seed, crop_scale=data.crop_scale)


def _digits_eval(data, *, seed, max_images):
    tr, va = (_digits(data, seed=seed, split=split, crop=False) for split in ("train", "val"))
    return (images_and_labels(tr[i] for i in range(min(len(tr), max_images))),
            images_and_labels(va[i] for i in range(min(len(va), max_images))))


# ----- imagefolder -----

def _folder(data, *, seed, split="train", crop=True, rank=0, world_size=1):
    from .folder import ImageFolder

    if not data.root:
        raise ValueError("data.dataset=imagefolder needs data.root (a folder of class subfolders)")
    return ImageFolder(data.root, image_size=data.image_size, crop=crop, seed=seed, crop_scale=data.crop_scale,
                       max_image_pixels=data.max_image_pixels)


def _folder_eval(data, *, seed, max_images):
    # No validation split: hold out a fixed fifth of a seeded subset, decoding only the subset (a folder may
    # hold millions of images).
    ds = _folder(data, seed=seed, crop=False)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    keep = perm[:min(len(ds), max_images)]
    cut = int(0.8 * len(keep))
    return (images_and_labels(ds[int(i)] for i in keep[:cut]),
            images_and_labels(ds[int(i)] for i in keep[cut:]))


# ----- shards -----

def _shards(data, *, seed, split="train", crop=True, rank=0, world_size=1):
    from .shards import ShardDataset

    return ShardDataset(data.root, image_size=data.image_size, crop=crop, seed=seed, crop_scale=data.crop_scale,
                        rank=rank, world_size=world_size, streams=max(1, data.num_workers),
                        max_image_pixels=data.max_image_pixels)


def _shards_loader(dataset, data, *, seed, batch_size, rank, world_size, start_state=None):
    from .shards import ShardLoader

    return ShardLoader(dataset, batch_size, num_workers=data.num_workers, start_state=start_state)


def _shards_eval(data, *, seed, max_images):
    # The first samples of the sorted shards, read front to back (shards allow no cheap random access);
    # every fifth is held out. Shards written by iwm-make-shards are shuffled, so these mix the classes.
    from .shards import ShardDataset, read_samples

    ds = ShardDataset(data.root, image_size=data.image_size, crop=False, seed=seed,
                      max_image_pixels=data.max_image_pixels)
    items = []
    for sid, path in enumerate(ds.paths):
        for ordinal, key, group in read_samples(path):
            items.append(ds.decode(sid, ordinal, key, group, epoch=0))
            if len(items) >= max_images:
                break
        if len(items) >= max_images:
            break
    return (images_and_labels(it for j, it in enumerate(items) if j % 5 != 4),
            images_and_labels(it for j, it in enumerate(items) if j % 5 == 4))


register("digits", build=_digits, eval_split=_digits_eval)
register("imagefolder", build=_folder, eval_split=_folder_eval)
register("shards", build=_shards, eval_split=_shards_eval, loader=_shards_loader)
if names() != DATASETS:
    raise ImportError(f"data.registry registers {names()} but data.choices.DATASETS names {DATASETS}")
