"""The training DataLoader: crops decoded in workers, uint8 batches, exact mid-epoch resume."""
from functools import partial

import torch
from torch.utils.data import DataLoader

from .collate import collate_skip_bad
from .sampler import ResumableSampler
from .workers import ignore_stop_signals, shutdown, stop_signals_held, track


class ResumableLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` that records consumption as batches are handed out.

    So ``sampler.state_dict()`` taken between steps names the exact next sample, however far the workers
    have prefetched. When an epoch is exhausted the sampler moves to the next epoch; iterating again starts
    it (``for batch in loader`` in an outer ``while`` loop runs forever over epochs). Its workers ignore
    SIGTERM and SIGINT (``iwm_fast.data.workers``); ``close()`` stops them.
    """

    def __iter__(self):
        sampler = self.sampler
        with stop_signals_held():
            batches = super().__iter__()  # starts the workers on the first pass (they persist)
        track(batches)
        for batch in batches:
            if isinstance(batch, dict) and batch.get("num_skipped"):
                self._count_distinct(batch)
            sampler.advance(self.batch_size)
            yield batch
        sampler.set_epoch(sampler.epoch + 1)

    def _count_distinct(self, batch):
        """Name the dropped samples (``skipped_indices``) and count in ``num_skipped`` only those no rank
        drew in an earlier epoch, so that summed over batches and ranks it counts unreadable files, not draws
        (exact on resume too: it depends on the sampler's position alone)."""
        sampler = self.sampler
        drawn = sampler.order()[sampler.position: sampler.position + self.batch_size]
        dropped = torch.ones(len(drawn), dtype=torch.bool)
        dropped[batch["batch_positions"]] = False
        skipped = drawn[dropped]
        batch["skipped_indices"] = skipped
        batch["num_skipped"] = int(sampler.unseen_before(sampler.epoch, self.batch_size)[skipped].sum())

    def state_dict(self):
        return self.sampler.state_dict()

    def close(self):
        """Stop the persistent workers (a later iteration starts new ones)."""
        shutdown(getattr(self, "_iterator", None))
        self._iterator = None


def build_loader(dataset, batch_size, *, rank=0, world_size=1, seed=0, num_workers=0, start_state=None,
                 shuffle=True, pin_memory=None, prefetch_factor=4):
    """``(loader, sampler)`` yielding ``{"images": uint8 [B, 3, S, S], "labels", "indices", "num_skipped"}``.

    ``num_skipped``: unreadable files first met in this batch (a file skipped again in a later epoch does not
    count again); such batches also name their dropped samples in ``skipped_indices``.

    Images stay uint8 until the engine moves them to the device (a quarter of float32's transfer);
    convert with ``iwm_fast.transforms.to_float``. ``batch_size`` is per rank. ``seed`` shuffles; the crops
    are keyed by the dataset's own seed, the epoch and the sample index. ``start_state`` is a
    ``sampler.state_dict()`` from a checkpoint.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    sampler = ResumableSampler(len(dataset), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                               drop_last=True, with_epoch=True)
    if sampler.num_samples < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than this rank's share of the dataset "
                         f"({sampler.num_samples} of {len(dataset)} samples over {world_size} ranks)")
    if start_state is not None:
        sampler.load_state_dict(start_state)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    workers = dict(persistent_workers=True, prefetch_factor=prefetch_factor,
                   worker_init_fn=ignore_stop_signals) if num_workers > 0 else {}
    loader = ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                             collate_fn=partial(collate_skip_bad, image_size=getattr(dataset, "image_size", None)),
                             drop_last=True, pin_memory=pin_memory, **workers)
    return loader, sampler
