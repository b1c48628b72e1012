"""The checkpointer component: when to save, what to resume from, and the guarantee that no saved weights are
non-finite. The file format and atomicity are ``iwm_fast.train.checkpoint``'s; which checkpoint is the newest
that verifies is the run directory's (``iwm_fast.run_dir.RunDir``)."""
import logging
import shutil

import torch

from ..run_dir import RunDir
from . import checkpoint as ckpt
from .guard import NonFiniteLossError

log = logging.getLogger("iwm_fast")


class Checkpointer:
    """Saves every ``every`` steps and at ``total_steps`` into ``run``'s checkpoints, keeping ``keep``."""

    def __init__(self, run, *, every, total_steps, keep, rank):
        self.run = RunDir(run)
        self.dir = self.run.checkpoints_dir
        self.every, self.total, self.keep, self.rank = every, total_steps, keep, rank
        self.latest = self.run.latest_checkpoint()

    def resume(self, model, optimizer):
        """Load the latest checkpoint that verifies; returns its meta dict, or None for a fresh run."""
        if self.latest is None:
            return None
        return ckpt.load_checkpoint(self.latest, model, optimizer, verify=False)  # the run verified it

    def discard(self):
        """Remove every checkpoint (rank 0; the ranks wait for it): they are of work that is not resumed."""
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        ckpt._barrier()
        self.latest = None

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
        self.run.mark_saved(self.latest)
        return self.latest
