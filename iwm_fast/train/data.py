"""The engine's input stream over ``iwm_fast.data``: datasets from the config, an endless resumable batch stream.

The sampler deals each epoch's permutation to the ranks strided (rank r takes positions r, r+W, ...), so the
k-th micro-batches of all ranks together are the k-th micro-batch of one process with W times the batch.
``rows_in_step`` maps this rank's samples to their positions in the step's global batch; masks and views are
drawn per position, so a sample's views and masks do not depend on the world size, and a checkpoint's data
position (samples consumed by all ranks) resumes on another number of processes with the same global batch.
Shards are read per rank and loader worker, so a shard position holds every rank's (``checkpoint_state``) and
resumes on the same layout only.

``check_data`` is the dataset part of ``check_environment``: the registry's checks, with the position saved in
the run's newest checkpoint, before anything is written.
"""
import logging

import torch.distributed as dist

from ..data import registry
from ..data.choices import DECODES

log = logging.getLogger("iwm_fast")


def build_dataset(cfg, split="train", crop=True, *, rank=0, world_size=1):
    """The ``data.dataset`` named in the config (``iwm_fast.data.registry``)."""
    return registry.get(cfg.data.dataset).build(cfg.data, seed=cfg.train.seed, split=split, crop=crop, rank=rank,
                                                world_size=world_size)


class BatchStream:
    """Endless micro-batches of this rank; ``state_dict()`` between steps names the exact next sample.

    With ``data.decode=gpu`` the JPEGs of each batch are decoded and cropped on this process's GPU (nvJPEG,
    ``iwm_fast.data.gpu_decode``); without a GPU or a matching torchvision it falls back to the CPU path
    with one log line.
    """

    def __init__(self, cfg, *, rank, world_size, micro_batch, start_state=None):
        data, seed = cfg.data, cfg.train.seed
        if data.decode not in DECODES:
            raise ValueError(f"data.decode must be one of {', '.join(map(repr, DECODES))}, got {data.decode!r}")
        spec = registry.get(data.dataset)
        dataset = spec.build(data, seed=seed, rank=rank, world_size=world_size)
        self.gpu = None
        if data.decode == "gpu":
            from ..data import gpu_decode

            self.gpu = gpu_decode.enable(dataset, log=log if rank == 0 else None)
        self.loader = spec.loader(dataset, data, seed=seed, batch_size=micro_batch, rank=rank, world_size=world_size,
                                  start_state=start_state)
        self._it = self._forever()

    def _forever(self):
        while True:
            yield from self.loader

    def __next__(self):
        batch = next(self._it)
        return self.gpu.finish(batch) if self.gpu is not None else batch

    def state_dict(self):
        """This rank's position: cheap, and what the device prefetcher records for every batch."""
        return self.loader.state_dict()

    def checkpoint_state(self, local=None):
        """The position a checkpoint holds, from this rank's ``local`` (default: now). Collective where ranks'
        positions differ (shards: every rank's is gathered); every rank calls it at a save."""
        local = self.state_dict() if local is None else local
        merge = getattr(self.loader, "merge_states", None)
        if merge is None:
            return local
        states = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, local)
        return merge(states)

    def close(self):
        self._it.close()
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


def saved_data_position(out_dir):
    """The data position in ``out_dir``'s newest complete checkpoint whose meta.json reads, or None (no
    checkpoint: a fresh run; a damaged one is the loop's to report)."""
    from .checkpoint import CheckpointError, complete_checkpoints, read_meta

    from ..run_dir import RunDir

    for path in reversed(complete_checkpoints(RunDir(out_dir).checkpoints_dir)):
        try:
            return read_meta(path).get("data")
        except CheckpointError:
            continue
    return None


def check_data(cfg, world_size):
    """The data part of ``check_environment``: the dataset's own checks (``registry.check``), against the
    position a resume would start from. Raises ConfigError."""
    saved = saved_data_position(cfg.train.out_dir) if cfg.train.out_dir else None
    registry.check(cfg.data, world_size=world_size, saved=saved)


def rows_in_step(k, *, micro_batch, rank, world_size, batch_positions, device):
    """Positions in the step's global batch of this rank's samples of micro-batch ``k``.

    ``batch_positions`` are the samples' places in the local micro-batch (gaps where unreadable files were
    dropped), so the surviving samples keep their own views and masks.
    """
    base = k * micro_batch * world_size + rank
    return base + world_size * batch_positions.to(device)
