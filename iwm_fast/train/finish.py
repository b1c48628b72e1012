"""The end of a run: export the target encoder and evaluate it; a rerun completes whichever is missing."""
import logging
import os

import torch.distributed as dist

from . import checkpoint as ckpt
from .stop_signal import exit_on_stop_signals

log = logging.getLogger("iwm_fast")


def export_path(run_dir):
    return os.path.join(run_dir, "target_encoder.pt")


def eval_path(run_dir):
    return os.path.join(run_dir, "eval.json")


def missing_outputs(cfg, run_dir):
    missing = [] if os.path.exists(export_path(run_dir)) else ["target_encoder.pt"]
    if cfg.eval.enabled and not os.path.exists(eval_path(run_dir)):
        missing.append("eval.json")
    return missing


def finish(cfg, model, run_dir, rank):
    """Export the target encoder, then evaluate (rank 0), skipping what a previous attempt already wrote."""
    with exit_on_stop_signals("the end-of-run export and evaluation",
                              "training is complete and saved in its final checkpoint; run the same command "
                              "again to write what is missing (nothing is retrained)"):
        state = ckpt.full_model_state(model)
        if rank == 0:
            if not os.path.exists(export_path(run_dir)):
                ckpt.export_target_encoder(state, export_path(run_dir))
            if cfg.eval.enabled and not os.path.exists(eval_path(run_dir)):
                from .evaluate import evaluate_run
                evaluate_run(run_dir, cfg=cfg, model_state=state)
        if dist.is_initialized():
            dist.barrier()
