"""Evaluation of a run directory: the glue between the engine's config/checkpoints and ``iwm_fast.eval``."""
import logging
import os

import torch

from ..eval.evaluate import evaluate
from ..models import build_iwm
from ..eval.report import format_summary, plot_loss_curve, write_eval
from ..config import ConfigError

# What iwm-eval may change in a run's saved config: the evaluation itself and where it runs. Anything else
# (the model, the data) would evaluate a different setup than the one trained, or fail to load its checkpoint.
EVAL_OVERRIDABLE = ("eval.", "train.device=")

log = logging.getLogger("iwm_fast")


def eval_splits(cfg):
    from ..data import registry

    return registry.get(cfg.data.dataset).eval_split(cfg.data, seed=cfg.train.seed,
                                                     max_images=cfg.eval.max_train_images)


def _load_latest_state(run_dir, model):
    from . import checkpoint as ckpt

    path = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint that verifies")
    meta = ckpt.load_checkpoint(path, model)
    return meta["step"]


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


def evaluate_run(run_dir, *, cfg=None, model_state=None, overrides=()):
    """Probe accuracy (trained vs random encoder) and world-model MRR; writes ``eval.json`` and the loss plot.

    Without ``model_state`` the run's newest checkpoint that verifies is loaded (strictly), and a finished
    run's missing ``target_encoder.pt`` is exported from it. Outputs that cannot be written (a read-only run
    directory) are warned about; the results are printed either way.
    """
    from .resume import load_run_config

    _check_overrides(overrides)
    if cfg is None:
        cfg = load_run_config(run_dir, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model = build_iwm(cfg)
    if model_state is not None:
        model.load_state_dict(model_state)
        step = cfg.train.steps
    else:
        step = _load_latest_state(run_dir, model)
        _export_if_missing(run_dir, model, step, cfg.train.steps)
    model = model.to(device).eval()
    (train_x, train_y), (val_x, val_y) = eval_splits(cfg)
    results = evaluate(model, train_x, train_y, val_x, val_y, bank_size=cfg.eval.bank_size,
                       num_queries=cfg.eval.num_queries, cfg=cfg.augment, seed=cfg.train.seed, device=device,
                       probe_epochs=cfg.eval.probe_epochs, picture=os.path.join(run_dir, "world_model.png"))
    results["step"] = step
    _try_write("the results", os.path.join(run_dir, "eval.json"), lambda: write_eval(run_dir, results))
    metrics = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(metrics):
        png = os.path.join(run_dir, "loss_curve.png")
        _try_write("the loss plot", png, lambda: plot_loss_curve(metrics, png))
    print(format_summary(results), flush=True)
    return results


def _export_if_missing(run_dir, model, step, total):
    """A run killed between its last checkpoint and the export has no target_encoder.pt: write it from the
    final checkpoint. An unfinished run's encoder is not exported (the file means "the trained encoder")."""
    from .checkpoint import export_target_encoder

    path = os.path.join(run_dir, "target_encoder.pt")
    if os.path.exists(path):
        return
    if step < total:
        log.info("%s not written: the run is at step %d of %d", path, step, total)
        return
    if _try_write("the target encoder", path, lambda: export_target_encoder(model.state_dict(), path)):
        log.info("wrote %s from the step-%d checkpoint", path, step)
