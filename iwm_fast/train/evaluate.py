"""Evaluation of a run directory: the glue between the engine's config/checkpoints and ``iwm_fast.eval``."""
import logging
import os

import torch

from ..eval.evaluate import evaluate
from ..eval.features import random_init_encoder
from ..eval.picture import world_model_figure
from ..eval.report import format_summary, plot_loss_curve, write_eval
from ..models import build_iwm
from ..run_dir import RunDir
from ..config import ConfigError
from ..run_lock import outputs_lock

# What iwm-eval may change in a run's saved config: the evaluation itself and where it runs. Anything else
# (the model, the data) would evaluate a different setup than the one trained, or fail to load its checkpoint.
EVAL_OVERRIDABLE = ("eval.", "train.device=")
PICTURE_QUERIES = 4  # rows of world_model.png

log = logging.getLogger("iwm_fast")


def eval_splits(cfg):
    from ..data import registry

    (xtr, ytr), (xva, yva) = registry.get(cfg.data.dataset).eval_split(cfg.data, seed=cfg.train.seed,
                                                                       max_images=cfg.eval.max_train_images)
    warn_if_one_class(ytr, yva)
    return (xtr, ytr), (xva, yva)


def warn_if_one_class(train_labels, val_labels):
    """A classifier trained on one class, or scored on one, gets accuracy 1.0 whatever its features."""
    for what, labels in (("training", train_labels), ("evaluation", val_labels)):
        classes = torch.unique(torch.as_tensor(labels))
        if classes.numel() < 2:
            log.warning("the %s split holds images of one class only (%s): its accuracy is meaningless; give data "
                        "of two classes or more", what, ", ".join(str(int(c)) for c in classes) or "none")


def _check_overrides(overrides):
    for item in overrides:
        if not item.strip().startswith(EVAL_OVERRIDABLE):
            raise ConfigError(f"iwm-eval takes only eval.* (and train.device) overrides, got {item!r}: the model "
                              "and data are the run's own")


def _try_write(what, path, write):
    """Write an output of the evaluation; a read-only or full run directory is a warning, not a lost result."""
    try:
        write()
        return True
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("could not write %s %s (%s); the results are printed below", what, path, e)
        return False


def _save_outputs(run, record, outputs):
    """Write each ``(what, path, write)`` and record it as of the checkpoint ``record``, holding the run's outputs
    lock; a file's record is dropped before it is replaced, so no crash leaves a file vouched for wrongly."""
    try:
        with outputs_lock(run):
            for what, path, write in outputs:
                if _try_write("the record of", run.outputs_path, lambda: run.record_output(path, None)) and \
                        _try_write(what, path, write):
                    _try_write("the record of", run.outputs_path, lambda: run.record_output(path, record))
    except OSError as e:  # no lock file: nothing can be written there
        log.warning("could not write to %s (%s); the results are printed below", run.path, e)


def _model(run, cfg, model_state, record):
    """(model, step, record): the weights given, or the run's newest checkpoint that verifies (refreshing a
    finished run's target encoder from it where it is missing or of another checkpoint)."""
    if model_state is None:
        loaded = run.load_model(cfg=cfg)
        record = run.checkpoint_record(loaded.checkpoint)
        _export_if_outdated(run, loaded.model, record, cfg.train.steps)
        return loaded.model, loaded.step, record
    model = build_iwm(cfg)
    model.load_state_dict(model_state)
    return model, cfg.train.steps if record is None else record["step"], record  # None: vouched for by no record


def evaluate_run(run_dir, *, cfg=None, model_state=None, record=None, overrides=()):
    """Probe accuracy (trained vs random encoder) and world-model MRR; writes ``eval.json`` and the pictures,
    each recorded as of the checkpoint evaluated.

    Without ``model_state`` the run's newest checkpoint that verifies is loaded (strictly), and a finished
    run's target_encoder.pt is refreshed from it where it is missing or of another checkpoint; with it,
    ``record`` (``RunDir.checkpoint_record``) names the checkpoint those weights come from. Outputs that cannot
    be written (a read-only run directory) are warned about; the results are printed either way.
    """
    run = RunDir(run_dir)
    _check_overrides(overrides)
    cfg = run.read_config(overrides) if cfg is None else cfg
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model, step, record = _model(run, cfg, model_state, record)
    model = model.to(device).eval()
    control = random_init_encoder(cfg, cfg.train.seed).to(device)  # the model at step 0
    (train_x, train_y), (val_x, val_y) = eval_splits(cfg)
    results = evaluate(model, train_x, train_y, val_x, val_y, random_encoder=control, bank_size=cfg.eval.bank_size,
                       num_queries=cfg.eval.num_queries, cfg=cfg.augment, seed=cfg.train.seed, device=device,
                       probe_epochs=cfg.eval.probe_epochs, examples=PICTURE_QUERIES)
    examples = results.pop("examples")
    results["step"] = step
    outputs = [("the results", run.eval_path, lambda: write_eval(run.eval_path, results)),
               ("the world-model picture", run.world_model_png,
                lambda: log.info("eval: world-model picture in %s", world_model_figure(examples, run.world_model_png)))]
    if os.path.exists(run.metrics_path):
        outputs.append(("the loss plot", run.loss_curve_png,
                        lambda: plot_loss_curve(run.metrics_path, run.loss_curve_png)))
    _save_outputs(run, record, outputs)
    print(format_summary(results), flush=True)
    return results


def _export_if_outdated(run, model, record, total):
    """A run killed between its last checkpoint and the export has no target_encoder.pt, an extended or
    retrained one an old one: write it from the final checkpoint. An unfinished run's encoder is not exported
    (the file means "the trained encoder")."""
    from .finish import write_export

    path = run.export_path
    if run.is_current(path, record):
        return
    if record["step"] < total:
        log.info("%s not written: the run is at step %d of %d", path, record["step"], total)
        return
    if _try_write("the target encoder", path, lambda: write_export(run, model.state_dict(), record)):
        log.info("wrote %s from the step-%d checkpoint", path, record["step"])
