"""``data.dataset`` names -> how to build the training set, its resumable loader and its evaluation split.

The engine (``train.data.BatchStream``) and the evaluation (``train.evaluate``) both look datasets up here,
so a new source is one ``register`` call. Registered: ``digits``, ``imagefolder``, ``shards``.
"""
from dataclasses import dataclass
from collections.abc import Callable

import torch

_REGISTRY = {}


@dataclass(frozen=True)
class DatasetSpec:
    """``build(cfg, *, split, crop, rank, world_size)`` -> dataset; ``loader(dataset, cfg, *, batch_size, rank,
    world_size, start_state)`` -> an iterable of batches (each pass the rest of an epoch) with ``state_dict()``;
    ``eval_split(cfg)`` -> ``((train_images, train_labels), (val_images, val_labels))`` of evaluation views."""
    name: str
    build: Callable
    loader: Callable
    eval_split: Callable


def register(name, *, build, eval_split, loader=None):
    if name in _REGISTRY:
        raise ValueError(f"data.dataset {name!r} is already registered")
    _REGISTRY[name] = DatasetSpec(name, build, loader or map_style_loader, eval_split)


def names():
    return tuple(_REGISTRY)


def get(name):
    if name not in _REGISTRY:
        raise ValueError(f"unknown data.dataset {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def map_style_loader(dataset, cfg, *, batch_size, rank, world_size, start_state=None):
    """A ``ResumableLoader`` over a map-style dataset (sample keys from a ``ResumableSampler``)."""
    from .loader import build_loader

    loader, _ = build_loader(dataset, batch_size, rank=rank, world_size=world_size, seed=cfg.train.seed,
                             num_workers=cfg.data.num_workers, start_state=start_state)
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

def _digits(cfg, *, split="train", crop=True, rank=0, world_size=1):
    from .digits import BundledDigits

    return BundledDigits(split=split, image_size=cfg.data.image_size, crop=crop, seed=cfg.train.seed,
                         crop_scale=cfg.data.crop_scale)


def _digits_eval(cfg):
    limit = cfg.eval.max_train_images
    tr, va = _digits(cfg, split="train", crop=False), _digits(cfg, split="val", crop=False)
    return (images_and_labels(tr[i] for i in range(min(len(tr), limit))),
            images_and_labels(va[i] for i in range(min(len(va), limit))))


# ----- imagefolder -----

def _folder(cfg, *, split="train", crop=True, rank=0, world_size=1):
    from .folder import ImageFolder

    if not cfg.data.root:
        raise ValueError("data.dataset=imagefolder needs data.root (a folder of class subfolders)")
    return ImageFolder(cfg.data.root, image_size=cfg.data.image_size, crop=crop, seed=cfg.train.seed,
                       crop_scale=cfg.data.crop_scale, max_image_pixels=cfg.data.max_image_pixels)


def _folder_eval(cfg):
    # No validation split: hold out a fixed fifth of a seeded subset, decoding only the subset (a folder may
    # hold millions of images).
    ds = _folder(cfg, crop=False)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.train.seed))
    keep = perm[:min(len(ds), cfg.eval.max_train_images)]
    cut = int(0.8 * len(keep))
    return (images_and_labels(ds[int(i)] for i in keep[:cut]),
            images_and_labels(ds[int(i)] for i in keep[cut:]))


# ----- shards -----

def _shards(cfg, *, split="train", crop=True, rank=0, world_size=1):
    from .shards import ShardDataset

    return ShardDataset(cfg.data.root, image_size=cfg.data.image_size, crop=crop, seed=cfg.train.seed,
                        crop_scale=cfg.data.crop_scale, rank=rank, world_size=world_size,
                        streams=max(1, cfg.data.num_workers), max_image_pixels=cfg.data.max_image_pixels)


def _shards_loader(dataset, cfg, *, batch_size, rank, world_size, start_state=None):
    from .shards import ShardLoader

    return ShardLoader(dataset, batch_size, num_workers=cfg.data.num_workers, start_state=start_state)


def _shards_eval(cfg):
    # The first samples of the sorted shards, read front to back (shards allow no cheap random access);
    # every fifth is held out. Shards written by iwm-make-shards are shuffled, so these mix the classes.
    from .shards import ShardDataset, read_samples

    ds = ShardDataset(cfg.data.root, image_size=cfg.data.image_size, crop=False, seed=cfg.train.seed,
                      max_image_pixels=cfg.data.max_image_pixels)
    items = []
    for sid, path in enumerate(ds.paths):
        for ordinal, key, group in read_samples(path):
            items.append(ds.decode(sid, ordinal, key, group, epoch=0))
            if len(items) >= cfg.eval.max_train_images:
                break
        if len(items) >= cfg.eval.max_train_images:
            break
    return (images_and_labels(it for j, it in enumerate(items) if j % 5 != 4),
            images_and_labels(it for j, it in enumerate(items) if j % 5 == 4))


register("digits", build=_digits, eval_split=_digits_eval)
register("imagefolder", build=_folder, eval_split=_folder_eval)
register("shards", build=_shards, eval_split=_shards_eval, loader=_shards_loader)
