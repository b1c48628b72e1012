"""The engine's input stream over ``iwm_fast.data``: datasets from the config, an endless resumable batch stream.

The sampler deals each epoch's permutation to the ranks strided (rank r takes positions r, r+W, ...), so the
k-th micro-batches of all ranks together are the k-th micro-batch of one process with W times the batch.
``rows_in_step`` maps this rank's samples to their positions in the step's global batch; masks and views are
drawn per position, so a sample's views and masks do not depend on the world size.
"""
import torch

from .. import data as datasets


def build_dataset(cfg, split="train", crop=True):
    d = cfg.data
    if d.dataset == "digits":
        return datasets.BundledDigits(split=split, image_size=d.image_size, crop=crop, seed=cfg.train.seed,
                                      crop_scale=d.crop_scale)
    if d.dataset == "imagefolder":
        if not d.root:
            raise ValueError("data.dataset=imagefolder needs data.root (a folder of class subfolders)")
        return datasets.ImageFolder(d.root, image_size=d.image_size, crop=crop, seed=cfg.train.seed,
                                    crop_scale=d.crop_scale)
    raise ValueError(f"unknown data.dataset {d.dataset!r}; choose digits or imagefolder")


class BatchStream:
    """Endless micro-batches of this rank; ``state_dict()`` between steps names the exact next sample."""

    def __init__(self, cfg, *, rank, world_size, micro_batch, start_state=None):
        self.loader, self.sampler = datasets.build_loader(
            build_dataset(cfg), micro_batch, rank=rank, world_size=world_size, seed=cfg.train.seed,
            num_workers=cfg.data.num_workers, start_state=start_state)
        self._it = self._forever()

    def _forever(self):
        while True:
            yield from self.loader

    def __next__(self):
        return next(self._it)

    def state_dict(self):
        return self.sampler.state_dict()

    def close(self):
        self._it.close()


def rows_in_step(k, *, micro_batch, rank, world_size, batch_positions, device):
    """Positions in the step's global batch of this rank's samples of micro-batch ``k``.

    ``batch_positions`` are the samples' places in the local micro-batch (gaps where unreadable files were
    dropped), so the surviving samples keep their own views and masks.
    """
    base = k * micro_batch * world_size + rank
    return base + world_size * batch_positions.to(device)
