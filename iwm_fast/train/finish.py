"""The end of a run: export the target encoder and evaluate it from the final checkpoint.

Every output records the checkpoint it came from (``RunDir.record_output``); the end of a run, and a rerun of a
finished one, recomputes each output that is missing or was written from another checkpoint: an extended run's
outputs of its old last step, a retrained model's leftovers, an ``iwm-eval`` of a mid-run checkpoint.
"""
import logging
import os

import torch.distributed as dist

from . import checkpoint as ckpt
from ..run_lock import outputs_lock
from .stop_signal import exit_on_stop_signals

log = logging.getLogger("iwm_fast")


def eval_outputs(run):
    """The files one evaluation writes (``train.evaluate.evaluate_run``)."""
    return [run.eval_path, run.world_model_png, run.loss_curve_png]


def outdated_outputs(cfg, run, record):
    """The outputs of a finished run (``RunDir``) that are missing or not of the checkpoint ``record``, by name.
    An evaluation is redone whole: any of its files out of date puts eval.json on the list."""
    todo = [] if run.is_current(run.export_path, record) else [run.export_path]
    if cfg.eval.enabled:
        stale = any(os.path.exists(p) and not run.is_current(p, record) for p in eval_outputs(run))
        if stale or not os.path.exists(run.eval_path):
            todo.append(run.eval_path)
    return [os.path.basename(p) for p in todo]


def write_export(run, state, record):
    """``target_encoder.pt`` from the full model ``state``, recorded as of the checkpoint ``record``."""
    with outputs_lock(run):
        run.record_output(run.export_path, None)  # a crash mid-write leaves a file no record vouches for
        ckpt.export_target_encoder(state, run.export_path)
        run.record_output(run.export_path, record)


def finish(cfg, model, run, rank, checkpoint):
    """Export the target encoder, then evaluate (rank 0), of the final ``checkpoint`` (its folder); each output
    already written from that checkpoint is kept."""
    with exit_on_stop_signals("the end-of-run export and evaluation",
                              "training is complete and saved in its final checkpoint; run the same command "
                              "again to write what is missing (nothing is retrained)"):
        state = ckpt.full_model_state(model)
        if rank == 0:
            record = run.checkpoint_record(checkpoint)
            todo = outdated_outputs(cfg, run, record)
            if os.path.basename(run.export_path) in todo:
                write_export(run, state, record)
            if os.path.basename(run.eval_path) in todo:
                from .evaluate import evaluate_run
                evaluate_run(run, cfg=cfg, model_state=state, record=record)
            elif not cfg.eval.enabled:
                _warn_stale_eval(run, record)
        if dist.is_initialized():
            dist.barrier()


def _warn_stale_eval(run, record):
    old = [os.path.basename(p) for p in eval_outputs(run) if os.path.exists(p) and not run.is_current(p, record)]
    if old:
        log.warning("%s in %s are not of the final checkpoint (step %d) and eval.enabled=false leaves them; "
                    "iwm-eval %s refreshes them", ", ".join(old), run.path, record["step"], run.path)
