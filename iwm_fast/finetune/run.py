"""Fine-tuning of a pretrained run on a labelled dataset: the protocols, their options and their results.

The pretrained model comes from the run directory (``RunDir.load_model``: its config and newest checkpoint that
verifies); the classifiers train on the engine's pieces (``train.py``); the probe protocol is the evaluation's own
linear probe (``eval.probe.probe_encoder``). The data are the run's own evaluation splits
(``train.evaluate.eval_splits``: the digits' train/val split, or a seeded 80/20 split of an image folder).
"""
import dataclasses
import logging
import math
import os
import time

import torch

from ..eval.probe import probe_encoder
from ..eval.report import write_json
from ..run_dir import RunDir
from ..run_lock import lock_run
from .train import train_classifier

log = logging.getLogger("iwm_fast")

PROTOCOLS = ("predictor", "encoder", "probe")
PREDICTOR_INITS = ("pretrained", "random")


@dataclasses.dataclass
class FinetuneArgs:
    protocol: str = "predictor"
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    predictor_init: str = "pretrained"
    weight_decay: float = 0.05
    data_root: str = ""           # an image folder to fine-tune on instead of the run's own data

    def validate(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.predictor_init not in PREDICTOR_INITS:
            raise ValueError(f"unknown predictor init {self.predictor_init!r}; choose {' or '.join(PREDICTOR_INITS)}")
        if self.predictor_init == "random" and self.protocol != "predictor":
            raise ValueError("--predictor-init random applies to --protocol predictor only")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if self.data_root and not os.path.isdir(self.data_root):
            raise ValueError(f"data root {self.data_root} is not a folder")
        return self

    @property
    def name(self):
        """Output name: ``finetune_<protocol>``, with ``_random`` for the randomly initialised predictor."""
        return f"finetune_{self.protocol}" + ("_random" if self.predictor_init == "random" else "")


def _splits(cfg):
    from ..train.evaluate import eval_splits

    (xtr, ytr), (xva, yva) = eval_splits(cfg)
    return xtr.float().div_(255.0) if xtr.dtype == torch.uint8 else xtr, ytr, \
        xva.float().div_(255.0) if xva.dtype == torch.uint8 else xva, yva


def _probe(args, cfg, model, data, num_classes, rank):
    """The probe protocol: the evaluation's linear probe on the frozen target encoder's pooled features."""
    xtr, ytr, xva, yva = data
    enc = model.target_encoder
    res = probe_encoder(enc, xtr, ytr, xva, yva, epochs=cfg.eval.probe_epochs, seed=args.seed,
                        show_progress=rank == 0, stage="finetune_probe")
    return res["probe_acc"], enc.embed_dim * num_classes + num_classes


def run_finetune(run_dir, args: FinetuneArgs):
    """Fine-tune ``run_dir``'s model by ``args.protocol``; returns ``(results, model)``; writes no JSON."""
    results, net, _ = _finetune(run_dir, args, save=False)
    return results, net


def finetune_and_save(run_dir, args: FinetuneArgs):
    """Run the protocol and write ``RUN_DIR/<args.name>.json`` (rank 0); returns ``(results, the JSON's path)``,
    the path None where it could not be written (a warning says why; the results are the caller's to print)."""
    results, _, path = _finetune(run_dir, args, save=True)
    return results, path


def finetune(run_dir, args: FinetuneArgs):
    """Run the protocol and write ``RUN_DIR/<args.name>.json`` (rank 0); returns the results dict."""
    return finetune_and_save(run_dir, args)[0]


def _finetune(run_dir, args, *, save):
    """The protocol under the run directory's writer lock (``run_lock``), and its JSON where ``save``. A run
    directory that cannot be written is fine-tuned without checkpoints or metrics, with one warning."""
    from ..train.distributed import init_distributed

    args.validate()
    run = RunDir(run_dir)
    cfg = run.read_config(["data.dataset=imagefolder", f"data.root={args.data_root}"] if args.data_root else ())
    t0 = time.perf_counter()
    rank, world, device = init_distributed(cfg.train.device)
    with lock_run(run, "iwm-finetune", rank) as lock:
        if lock.read_only and rank == 0:
            log.warning("%s cannot be written: %s runs without checkpoints or metrics, and its results are "
                        "printed, not saved", run.path, args.name)
        results, net = _protocol(run, args, cfg, rank, world, device, writable=not lock.read_only)
        results["seconds"] = time.perf_counter() - t0
        path = None
        if save and rank == 0:
            path = _write_results(run.finetune_path(args.name), results)
    return results, net, path


def _write_results(path, results):
    try:
        return write_json(path, results)
    except OSError as e:
        log.warning("could not save the results to %s (%s); they are printed below", path, e.strerror or e)
        return None


def _protocol(run, args, cfg, rank, world, device, *, writable):
    pretrained = run.load_model(cfg=cfg)  # also restores the pretraining RNG: the head is seeded after this
    if pretrained.step < cfg.train.steps and rank == 0:
        log.warning("%s is at step %d of its train.steps=%d: fine-tuning an unfinished pretraining", run.path,
                    pretrained.step, cfg.train.steps)
    data = _splits(cfg)
    num_classes = int(max(data[1].max(), data[3].max())) + 1
    if args.protocol == "probe":
        acc, n_params = _probe(args, cfg, pretrained.model, data, num_classes, rank)
        history, net, steps = None, None, 0
    else:
        origin = run.checkpoint_record(pretrained.checkpoint)
        history, n_params, net, steps = train_classifier(run, args, cfg, pretrained.model, data, num_classes, rank,
                                                         world, device, pretrain=origin, writable=writable)
        acc = history[-1]
    trained = args.protocol != "probe"
    results = {"accuracy": acc, "protocol": args.protocol,
               "predictor_init": args.predictor_init if args.protocol == "predictor" else None,
               "trainable_params": n_params, "seconds": None,
               "epochs": args.epochs if trained else None, "lr": args.lr, "batch_size": args.batch_size,
               "seed": args.seed, "steps": steps, "pretrain_step": pretrained.step, "num_classes": num_classes,
               "train_images": int(data[0].shape[0]), "val_images": int(data[2].shape[0]), "world_size": world}
    if trained:
        results["val_accuracy_per_epoch"] = history
    return results, net
