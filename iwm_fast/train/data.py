"""The engine's input stream: which samples each rank reads at each step, resumable to the exact batch.

Every step reads one global batch: ``accum_steps`` rounds of ``micro_batch * world_size`` consecutive positions
of the epoch's permutation (drawn from (seed, epoch)). Rank ``r`` takes the ``r``-th slice of each round, so a
sample's position in the global batch, and with it its masks and views, does not depend on the world size.
"""
import dataclasses

import torch
from torch.utils.data import DataLoader, Sampler


@dataclasses.dataclass
class RawBatch:
    images: torch.Tensor   # [B, 3, H, W] uint8 (or float in [0, 1]), already cropped and flipped on the CPU
    labels: torch.Tensor
    num_skipped: int = 0   # unreadable files dropped from this batch


class RoundSampler(Sampler):
    """Yields this rank's index list for each round, forever, starting after ``rounds_done`` rounds."""

    def __init__(self, num_samples, *, micro_batch, rank, world_size, seed, rounds_done=0):
        per_round = micro_batch * world_size
        if num_samples < per_round:
            raise ValueError(f"the dataset has {num_samples} images, fewer than one round of "
                             f"{per_round} (micro-batch {micro_batch} x {world_size} ranks)")
        self.n, self.micro, self.rank, self.seed = num_samples, micro_batch, rank, seed
        self.per_round = per_round
        self.rounds_per_epoch = num_samples // per_round
        self.rounds_done = rounds_done

    def _perm(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        r = self.rounds_done
        while True:
            epoch, j = divmod(r, self.rounds_per_epoch)
            perm = self._perm(epoch)
            while j < self.rounds_per_epoch:
                start = j * self.per_round + self.rank * self.micro
                yield [(epoch, int(i)) for i in perm[start:start + self.micro]]
                j += 1
                r += 1


class EpochIndexed(torch.utils.data.Dataset):
    """Passes (epoch, index) through, so that crops depend on them rather than on worker RNG state."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        return self.dataset.get(index, epoch=epoch)


class TrainingData:
    def __init__(self, loader, collate_out):
        self.loader = loader
        self._it = iter(loader)
        self._convert = collate_out

    def close(self):
        del self._it


def next_batch(data):
    return data._convert(next(data._it))


def _to_raw(batch):
    if isinstance(batch, dict):
        return RawBatch(batch["images"], batch["labels"], int(batch.get("num_skipped", 0)))
    images, labels = batch[0], batch[1]
    return RawBatch(images, labels, int(batch[2]) if len(batch) > 2 else 0)


def build_dataset(cfg, split="train", crop=True):
    from .. import data as datasets

    d = cfg.data
    if d.dataset == "digits":
        return datasets.BundledDigits(split=split, image_size=d.image_size, crop=crop, seed=cfg.train.seed)
    if d.dataset == "imagefolder":
        if not d.root:
            raise ValueError("data.dataset=imagefolder needs data.root (a folder of class subfolders)")
        return datasets.ImageFolder(d.root, image_size=d.image_size, crop=crop, seed=cfg.train.seed)
    raise ValueError(f"unknown data.dataset {d.dataset!r}; choose digits or imagefolder")


def build_training_data(cfg, *, rank, world_size, micro_batch, batches_done):
    from .. import data as datasets

    dataset = build_dataset(cfg)
    sampler = RoundSampler(len(dataset), micro_batch=micro_batch, rank=rank, world_size=world_size,
                           seed=cfg.train.seed, rounds_done=batches_done)
    workers = cfg.data.num_workers
    loader = DataLoader(EpochIndexed(dataset), batch_sampler=sampler, num_workers=workers,
                        collate_fn=datasets.collate_skip_bad, pin_memory=torch.cuda.is_available(),
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    return TrainingData(loader, _to_raw)
