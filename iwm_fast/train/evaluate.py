"""Evaluation of a run directory: the glue between the engine's config/checkpoints and ``iwm_fast.eval``."""
import logging
import os

import torch

from ..eval.evaluate import evaluate
from ..models import build_iwm
from ..eval.report import format_summary, plot_loss_curve, write_eval
from .config import load_config

log = logging.getLogger("iwm_fast")


def _images_and_labels(dataset, indices):
    images, labels = [], []
    for i in indices:
        item = dataset[int(i)]
        if item is None:  # an unreadable file
            continue
        image, label = item[0], item[1]
        images.append(torch.as_tensor(image))
        labels.append(int(label))
    if not images:
        raise RuntimeError("no readable images to evaluate on")
    return torch.stack(images), torch.tensor(labels)


def _eval_splits(cfg):
    from .data import build_dataset

    train_set = build_dataset(cfg, "train", crop=False)
    limit = cfg.eval.max_train_images
    if cfg.data.dataset == "digits":
        val_set = build_dataset(cfg, "val", crop=False)
        return (_images_and_labels(train_set, range(min(len(train_set), limit))),
                _images_and_labels(val_set, range(min(len(val_set), limit))))
    # A folder dataset without a validation split: hold out a fixed fifth of a seeded subset, decoding only
    # the subset (a folder may hold millions of images).
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.train.seed))
    keep = perm[:min(len(train_set), limit)]
    cut = int(0.8 * len(keep))
    return _images_and_labels(train_set, keep[:cut]), _images_and_labels(train_set, keep[cut:])


def _load_latest_state(run_dir, model):
    from . import checkpoint as ckpt

    path = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint")
    meta = ckpt.load_checkpoint(path, model)
    return meta["step"]


def evaluate_run(run_dir, *, cfg=None, model_state=None, overrides=()):
    """Probe accuracy (trained vs random encoder) and world-model MRR; writes ``eval.json`` and the loss plot."""
    if cfg is None:
        path = os.path.join(run_dir, "config.yaml")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml")
        cfg = load_config(path, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model = build_iwm(cfg)
    if model_state is not None:
        model.load_state_dict(model_state)
        step = cfg.train.steps
    else:
        step = _load_latest_state(run_dir, model)
    model = model.to(device).eval()
    (train_x, train_y), (val_x, val_y) = _eval_splits(cfg)
    results = evaluate(model, train_x, train_y, val_x, val_y, bank_size=cfg.eval.bank_size,
                       num_queries=cfg.eval.num_queries, cfg=cfg.augment, seed=cfg.train.seed, device=device,
                       probe_epochs=cfg.eval.probe_epochs, picture=os.path.join(run_dir, "world_model.png"))
    results["step"] = step
    write_eval(run_dir, results)
    metrics = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(metrics):
        plot_loss_curve(metrics, os.path.join(run_dir, "loss_curve.png"))
    print(format_summary(results), flush=True)
    return results
