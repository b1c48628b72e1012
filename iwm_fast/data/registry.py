"""``data.dataset`` names -> how to build the training set, its resumable loader and its evaluation split.

The engine (``train.data.BatchStream``) and the evaluation (``train.evaluate``) both look datasets up here,
so a new source is one ``register`` call. Registered: ``digits``, ``imagefolder``, ``shards``.

``check`` runs a dataset's checks before a run writes anything (``check_environment`` calls it): a missing
or empty root, a shard set without a matching manifest, too few shards for the loader workers, a resume whose
saved data position no longer fits the data or the layout. Each is one ``ConfigError`` line.
"""
import logging
import os
import warnings
from dataclasses import dataclass
from collections.abc import Callable

import torch

from .choices import DATASETS, add_dataset_name
log = logging.getLogger("iwm_fast")

_REGISTRY = {}


@dataclass(frozen=True)
class DatasetSpec:
    """Each receives the ``data`` config section and the values it needs, not the whole config:
    ``build(data, *, seed, split, crop, rank, world_size)`` -> dataset; ``loader(dataset, data, *, seed,
    batch_size, rank, world_size, start_state)`` -> an iterable of batches (each pass the rest of an epoch) with
    ``state_dict()``; ``eval_split(data, *, seed, max_images)`` -> ``((train_images, train_labels), (val_images,
    val_labels))`` of at most ``max_images`` evaluation views; ``check(data, *, world_size, saved)`` raises
    ValueError or OSError where the data cannot serve the run (``saved``: the data position a resume would start
    from, or None)."""
    name: str
    build: Callable
    loader: Callable
    eval_split: Callable
    check: Callable | None = None


def register(name, *, build, eval_split, loader=None, check=None):
    if name in _REGISTRY:
        raise ValueError(f"data.dataset {name!r} is already registered")
    _REGISTRY[name] = DatasetSpec(name, build, loader or map_style_loader, eval_split, check)
    add_dataset_name(name)


def check(data, *, world_size=1, saved=None):
    """The ``data.dataset``'s checks of the ``data`` section, before anything is written; raises ``ConfigError``
    (one line)."""
    from ..config import ConfigError

    spec = get(data.dataset)
    if spec.check is None:
        return
    try:
        spec.check(data, world_size=world_size, saved=saved)
    except ConfigError:
        raise
    except (ValueError, OSError) as err:
        raise ConfigError(" ".join(str(err).split())) from None


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

def _folder_check(data, *, world_size=1, saved=None):
    from .folder import ImageFolder, class_folders, has_images

    root = data.root
    if not root:
        raise ValueError("data.root must be set for data.dataset=imagefolder (a folder of class subfolders)")
    if not os.path.isdir(root):
        raise ValueError(f"data.root {root} {'is not a folder' if os.path.exists(root) else 'does not exist'}")
    with warnings.catch_warnings():  # the dataset itself warns about skipped links, once
        warnings.simplefilter("ignore")
        classes = class_folders(root)
        if not classes:
            raise ValueError(f"data.root {root} has no class subfolders (expected {root}/<class>/<image>)")
        if not has_images(root, classes):
            raise ValueError(f"data.root {root} holds no .jpg, .jpeg or .png file in its {len(classes)} class "
                             "folders")
        if isinstance(saved, dict) and "dataset_len" in saved:  # a resume: the listing must be the one saved
            n = len(ImageFolder(root, image_size=1, max_image_pixels=data.max_image_pixels))
            if n != saved["dataset_len"]:
                raise ValueError(f"data.root {root} holds {n} images but the run's last checkpoint was taken with "
                                 f"{saved['dataset_len']}: its data position would point at other samples; restore "
                                 "the folder as it was, or pick another train.out_dir")


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

def _shards_check(data, *, world_size=1, saved=None):
    from .manifest import shard_set
    from .shards import identity_mismatch, too_few_shards

    if not data.root:
        raise ValueError("data.dataset=shards needs data.root: a folder of .tar shards with its manifest.json, "
                         "or a comma list of them")
    found = shard_set(data.root)
    streams = max(1, data.num_workers)
    problem = too_few_shards(len(found.paths), world_size, streams)
    total = sum(found.samples)
    if not problem and total and found.unlabelled == total:
        problem = (f"none of the {total} samples of shard set {data.root} has a .cls label; every sample "
                   "needs one (the evaluation probes the labels): iwm-make-shards writes them")
    if not problem and isinstance(saved, dict) and saved.get("kind") == "shards":
        problem = identity_mismatch(saved, {"world_size": world_size, "streams": streams,
                                            "num_shards": len(found.paths), "set_digest": found.digest})
    if problem:
        raise ValueError(problem)


def _shards(data, *, seed, split="train", crop=True, rank=0, world_size=1):
    from .shards import ShardDataset

    ds = ShardDataset(data.root, image_size=data.image_size, crop=crop, seed=seed, crop_scale=data.crop_scale,
                      rank=rank, world_size=world_size, streams=max(1, data.num_workers),
                      max_image_pixels=data.max_image_pixels)
    found = ds.shard_set
    if rank == 0 and split == "train" and (found.skipped or found.unlabelled):
        log.warning("shard set %s: %d samples in %d shards; %d source files were unreadable when it was written "
                    "and %d samples have no .cls label (skipped)", data.root, sum(found.samples),
                    len(found.paths), found.skipped, found.unlabelled)
    return ds


def _shards_loader(dataset, data, *, seed, batch_size, rank, world_size, start_state=None):
    from .shards import ShardLoader

    return ShardLoader(dataset, batch_size, num_workers=data.num_workers, start_state=start_state)


def _shards_eval(data, *, seed, max_images):
    # An equal share of the first samples of every shard (a tar allows no cheap random access), so that a set
    # written class after class (iwm-make-shards --no-shuffle) still gives every class; every fifth is held out.
    import tarfile

    from .shards import ShardDataset, read_samples

    ds = ShardDataset(data.root, image_size=data.image_size, crop=False, seed=seed,
                      max_image_pixels=data.max_image_pixels)
    limit = max_images
    share = -(-limit // len(ds.paths))
    items = []
    for sid, path in enumerate(ds.paths):
        if len(items) >= limit:
            break
        taken = 0
        try:
            for ordinal, key, group in read_samples(path):
                if ordinal >= share or len(items) >= limit:
                    break
                items.append(ds.decode(sid, ordinal, key, group, epoch=0))
                taken += 1
        except (tarfile.TarError, OSError, EOFError) as err:
            log.warning("evaluation split: shard %s is broken after its first %d samples (%s)", path, taken, err)
    return (images_and_labels(it for j, it in enumerate(items) if j % 5 != 4),
            images_and_labels(it for j, it in enumerate(items) if j % 5 == 4))


register("digits", build=_digits, eval_split=_digits_eval)
register("imagefolder", build=_folder, eval_split=_folder_eval, check=_folder_check)
register("shards", build=_shards, eval_split=_shards_eval, loader=_shards_loader, check=_shards_check)
if names() != DATASETS:
    raise ImportError(f"data.registry registers {names()} but data.choices.DATASETS names {DATASETS}")
