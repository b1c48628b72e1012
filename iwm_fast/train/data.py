"""The engine's input stream over ``iwm_fast.data``: datasets from the config, an endless resumable batch stream.

The sampler deals each epoch's permutation to the ranks strided (rank r takes positions r, r+W, ...), so the
k-th micro-batches of all ranks together are the k-th micro-batch of one process with W times the batch.
``rows_in_step`` maps this rank's samples to their positions in the step's global batch; masks and views are
drawn per position, so a sample's views and masks do not depend on the world size.
"""
import logging

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
        return self.loader.state_dict()

    def close(self):
        self._it.close()


def rows_in_step(k, *, micro_batch, rank, world_size, batch_positions, device):
    """Positions in the step's global batch of this rank's samples of micro-batch ``k``.

    ``batch_positions`` are the samples' places in the local micro-batch (gaps where unreadable files were
    dropped), so the surviving samples keep their own views and masks.
    """
    base = k * micro_batch * world_size + rank
    return base + world_size * batch_positions.to(device)
