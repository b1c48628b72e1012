"""The checkpointer component: when to save, what to resume from, and the guarantee that no saved weights are
non-finite. The file format and atomicity are ``iwm_fast.train.checkpoint``'s."""
import logging
import os

import torch

from . import checkpoint as ckpt
from .guard import NonFiniteLossError

log = logging.getLogger("iwm_fast")


class Checkpointer:
    def __init__(self, run_dir, *, every, total_steps, keep, rank):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.every, self.total, self.keep, self.rank = every, total_steps, keep, rank
        self.latest = ckpt.latest_checkpoint(self.dir)

    def resume(self, model, optimizer):
        """Load the latest complete checkpoint; returns its meta dict, or None for a fresh run."""
        if self.latest is None:
            return None
        meta = ckpt.load_checkpoint(self.latest, model, optimizer)
        return meta

    def is_save_step(self, step):
        return step % self.every == 0 or step == self.total

    def save(self, step, model, optimizer, extra):
        # One host read per save (a save syncs anyway): weights that went non-finite must never replace the
        # last good checkpoint.
        finite = torch.stack([torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all()
                              for p in model.parameters()]).all()
        if not bool(finite):
            raise NonFiniteLossError(f"step {step}: the model's weights are not finite; not saving them. The last "
                                     f"good checkpoint is kept in {self.dir}")
        self.latest = ckpt.save_checkpoint(self.dir, step, model, optimizer, extra, keep=self.keep)
        return self.latest
