"""A distributed sampler that can stop and resume at the exact next sample of an epoch."""
import math

import torch
from torch.utils.data import Sampler

from ..transforms.seeding import generator


def split_key(key, length=None):
    """A sample key is an index, or ``(epoch, index)`` as yielded by ``ResumableSampler(with_epoch=True)``.

    With ``length``, an index outside ``[0, length)`` is an ``IndexError``.
    """
    if isinstance(key, (tuple, list)) and len(key) == 2:
        epoch, index = int(key[0]), int(key[1])
    elif isinstance(key, bool) or not isinstance(key, int):
        try:
            epoch, index = 0, int(key)  # numpy and 0-d tensor indices
        except (TypeError, ValueError):
            raise TypeError(f"sample key must be an int or (epoch, index), got {key!r}") from None
    else:
        epoch, index = 0, key
    if length is not None and not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {length} samples")
    return epoch, index


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


class ResumableSampler(Sampler):
    """Deals one seeded permutation per epoch to ``world_size`` ranks, strided: rank r gets positions
    r, r + W, r + 2W, ... So the k-th local batches of all ranks together hold exactly the samples of the
    k-th global batch of a single process with W times the batch size.

    ``drop_last=True`` cuts the permutation to a multiple of ``world_size`` (slices are disjoint);
    ``drop_last=False`` pads it by wrapping around (a few samples repeat).

    State is ``(epoch, position)``: position counts this rank's samples already consumed in the epoch.
    Iteration starts at ``position``; ``advance(n)`` records consumption (``ResumableLoader`` calls it as it
    hands out batches, so DataLoader prefetching does not count). The state is the same on every rank, and
    also says how many samples all ranks consumed (``samples_seen``): with ``drop_last`` a state resumes on
    another number of ranks at the same place of the epoch's permutation, since the k-th micro-batches of
    all ranks are the same slice of it whatever the rank count (see ``load_state_dict``).
    """

    def __init__(self, dataset_len, *, rank=0, world_size=1, seed=0, shuffle=True, drop_last=True,
                 with_epoch=False):
        _check_int("dataset_len", dataset_len, 1)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
        if drop_last and dataset_len < world_size:
            raise ValueError(f"dataset of {dataset_len} samples cannot be split over {world_size} ranks")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.with_epoch = int(seed), bool(shuffle), bool(drop_last), with_epoch
        total = (dataset_len // world_size if drop_last else math.ceil(dataset_len / world_size)) * world_size
        self.total_size = total
        self.num_samples = total // world_size
        self.epoch = 0
        self.position = 0

    def order(self, epoch=None):
        """This rank's dataset indices for ``epoch`` (default: the current one), from position 0."""
        epoch = self.epoch if epoch is None else epoch
        n = self.dataset_len
        perm = torch.randperm(n, generator=generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        if self.total_size > n:
            perm = perm.repeat(math.ceil(self.total_size / n))
        return perm[: self.total_size][self.rank:: self.world_size]

    def __iter__(self):
        epoch, start = self.epoch, self.position
        for i in self.order(epoch)[start:].tolist():
            yield (epoch, i) if self.with_epoch else i

    def __len__(self):
        return self.num_samples - self.position

    def set_epoch(self, epoch):
        """Move to ``epoch`` from its start; setting the current epoch again keeps the position (resume)."""
        _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, n):
        """Record that ``n`` more samples of this epoch were consumed."""
        _check_int("n", n, 0)
        self.position = min(self.num_samples, self.position + n)

    def unseen_before(self, epoch, batch_size):
        """Bool [dataset_len]: the indices no rank consumed in an epoch before ``epoch``.

        Each epoch the ranks together consume the first ``world_size * k`` places of the permutation, where
        ``k`` is what batches of ``batch_size`` take of a rank's share (the rest of it is dropped).
        """
        cached = getattr(self, "_unseen", None)
        if cached is None or cached[0] > epoch or cached[1] != batch_size:
            cached = (0, batch_size, torch.ones(self.dataset_len, dtype=torch.bool))
        e, _, mask = cached
        consumed = self.world_size * (self.num_samples // batch_size * batch_size)
        while e < epoch and bool(mask.any()):
            perm = torch.randperm(self.dataset_len, generator=generator(self.seed, e)) if self.shuffle \
                else torch.arange(self.dataset_len)
            if self.total_size > self.dataset_len:
                perm = perm.repeat(math.ceil(self.total_size / self.dataset_len))
            mask = mask.clone()
            mask[perm[:consumed]] = False
            e += 1
        self._unseen = (max(e, epoch) if not bool(mask.any()) else e, batch_size, mask)
        return mask

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "samples_seen": self.position * self.world_size,
                "seed": self.seed, "dataset_len": self.dataset_len, "world_size": self.world_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state):
        """Resume at a saved state, from this world size or another: ``samples_seen`` all ranks' samples
        consumed, i.e. ``samples_seen / world_size`` of this rank's. Another world size needs ``drop_last`` (a
        padded epoch's tail depends on it) and a count that splits evenly over the ranks (it does when the
        global batch is the same)."""
        if not isinstance(state, dict) or "epoch" not in state or "position" not in state:
            raise ValueError(f"sampler state must be a dict with 'epoch' and 'position', got {state!r}")
        for k in ("seed", "dataset_len", "shuffle", "drop_last"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state was saved with {k}={state[k]!r} but this sampler has "
                                 f"{k}={getattr(self, k)!r}; the saved position would point at other samples")
        epoch, saved_world = int(state["epoch"]), int(state.get("world_size", self.world_size))
        seen = int(state.get("samples_seen", int(state["position"]) * saved_world))
        if saved_world != self.world_size:
            if not self.drop_last:
                raise ValueError(f"sampler state was saved with world_size={saved_world}; without drop_last it "
                                 f"resumes on {saved_world} ranks only (the padded tail depends on the rank count)")
            if seen % self.world_size:
                raise ValueError(f"sampler state was saved with world_size={saved_world} after {seen} samples of "
                                 f"epoch {epoch}, which do not split over {self.world_size} ranks; resume with the "
                                 "same global batch size")
        pos = seen // self.world_size
        if epoch < 0 or not 0 <= pos <= self.num_samples:
            raise ValueError(f"sampler state out of range: epoch {epoch}, position {pos} of {self.num_samples}")
        self.epoch, self.position = epoch, pos
