"""SIGTERM (what SLURM and Kubernetes send before they kill a job): finish the step, save, exit.

The handler only sets a flag; the loop acts on it at a step boundary (every step in a one-process run; at log
steps when ranks must agree, since they may receive the signal at different steps). A watchdog ends the
process if that takes longer than ``grace_s`` seconds: a save cut short is never picked up (checkpoints are
renamed into place only when complete), so the previous checkpoint stays the one to resume from.
"""
import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger("iwm_fast")

EXIT_CODE = 143  # 128 + SIGTERM: a job manager must not mistake a stopped run for a finished one


class StopRequested(Exception):
    """Raised by the loop after the checkpoint of a requested stop is saved."""

    def __init__(self, step, checkpoint):
        super().__init__(f"stopped by SIGTERM after step {step}; saved {checkpoint}; run the same command "
                         "again to resume")
        self.step, self.checkpoint = step, checkpoint


class StopSignal:
    def __init__(self, grace_s, *, device, world_size):
        self.grace_s, self.device, self.world = grace_s, device, world_size
        self.requested_at = None
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame):
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic()
        log.warning("SIGTERM: saving a checkpoint at the next step boundary (grace %.0f s)", self.grace_s)
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self):
        time.sleep(self.grace_s)
        log.error("SIGTERM grace of %.0f s ran out before the checkpoint was saved; exiting. The previous "
                  "checkpoint is intact", self.grace_s)
        os._exit(EXIT_CODE)

    def should_stop(self, at_log_step):
        """Whether every rank stops now. Without other ranks, at any step; else at log steps, by agreement."""
        if self.world == 1:
            return self.requested_at is not None
        if not at_log_step:
            return False
        flag = torch.tensor([1.0 if self.requested_at is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
