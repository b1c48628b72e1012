"""The end of a run: export the target encoder and evaluate it; a rerun completes whichever is missing."""
import logging
import os

import torch.distributed as dist

from . import checkpoint as ckpt
from .stop_signal import exit_on_stop_signals

log = logging.getLogger("iwm_fast")


def missing_outputs(cfg, run):
    """The outputs of a finished run (``RunDir``) that are not there yet, by file name."""
    wanted = [run.export_path] + ([run.eval_path] if cfg.eval.enabled else [])
    return [os.path.basename(p) for p in wanted if not os.path.exists(p)]


def finish(cfg, model, run, rank):
    """Export the target encoder, then evaluate (rank 0), skipping what a previous attempt already wrote."""
    with exit_on_stop_signals("the end-of-run export and evaluation",
                              "training is complete and saved in its final checkpoint; run the same command "
                              "again to write what is missing (nothing is retrained)"):
        state = ckpt.full_model_state(model)
        if rank == 0:
            if not os.path.exists(run.export_path):
                ckpt.export_target_encoder(state, run.export_path)
            if cfg.eval.enabled and not os.path.exists(run.eval_path):
                from .evaluate import evaluate_run
                evaluate_run(run, cfg=cfg, model_state=state)
        if dist.is_initialized():
            dist.barrier()
