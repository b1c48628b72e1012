"""Evaluation of a run directory: the glue between the engine's config/checkpoints and ``iwm_fast.eval``."""
import logging
import os

import torch

from ..eval.evaluate import evaluate
from ..eval.features import random_init_encoder
from ..eval.report import format_summary, plot_loss_curve, write_eval
from ..models import build_iwm
from ..run_dir import RunDir
from ..config import ConfigError

# What iwm-eval may change in a run's saved config: the evaluation itself and where it runs. Anything else
# (the model, the data) would evaluate a different setup than the one trained, or fail to load its checkpoint.
EVAL_OVERRIDABLE = ("eval.", "train.device=")

log = logging.getLogger("iwm_fast")


def eval_splits(cfg):
    from ..data import registry

    return registry.get(cfg.data.dataset).eval_split(cfg.data, seed=cfg.train.seed,
                                                     max_images=cfg.eval.max_train_images)


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


def _model(run, cfg, model_state):
    """(model, step): the weights given, or the run's newest checkpoint that verifies (exporting a finished run's
    missing target encoder from it)."""
    if model_state is None:
        loaded = run.load_model(cfg=cfg)
        _export_if_missing(run, loaded.model, loaded.step, cfg.train.steps)
        return loaded.model, loaded.step
    model = build_iwm(cfg)
    model.load_state_dict(model_state)
    return model, cfg.train.steps


def evaluate_run(run_dir, *, cfg=None, model_state=None, overrides=()):
    """Probe accuracy (trained vs random encoder) and world-model MRR; writes ``eval.json`` and the loss plot.

    Without ``model_state`` the run's newest checkpoint that verifies is loaded (strictly), and a finished
    run's missing ``target_encoder.pt`` is exported from it. Outputs that cannot be written (a read-only run
    directory) are warned about; the results are printed either way.
    """
    run = RunDir(run_dir)
    _check_overrides(overrides)
    cfg = run.read_config(overrides) if cfg is None else cfg
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model, step = _model(run, cfg, model_state)
    model = model.to(device).eval()
    control = random_init_encoder(cfg, cfg.train.seed).to(device)  # the model at step 0
    (train_x, train_y), (val_x, val_y) = eval_splits(cfg)
    results = evaluate(model, train_x, train_y, val_x, val_y, random_encoder=control, bank_size=cfg.eval.bank_size,
                       num_queries=cfg.eval.num_queries, cfg=cfg.augment, seed=cfg.train.seed, device=device,
                       probe_epochs=cfg.eval.probe_epochs, picture=run.world_model_png)
    results["step"] = step
    _try_write("the results", run.eval_path, lambda: write_eval(run.eval_path, results))
    if os.path.exists(run.metrics_path):
        _try_write("the loss plot", run.loss_curve_png, lambda: plot_loss_curve(run.metrics_path, run.loss_curve_png))
    print(format_summary(results), flush=True)
    return results


def _export_if_missing(run, model, step, total):
    """A run killed between its last checkpoint and the export has no target_encoder.pt: write it from the
    final checkpoint. An unfinished run's encoder is not exported (the file means "the trained encoder")."""
    from .checkpoint import export_target_encoder

    path = run.export_path
    if os.path.exists(path):
        return
    if step < total:
        log.info("%s not written: the run is at step %d of %d", path, step, total)
        return
    if _try_write("the target encoder", path, lambda: export_target_encoder(model.state_dict(), path)):
        log.info("wrote %s from the step-%d checkpoint", path, step)
