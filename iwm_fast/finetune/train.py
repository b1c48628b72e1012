"""Training a fine-tuning classifier (``models.py``) on the engine's pieces.

FSDP2 sharding (``train.parallel.parallelize_blocks``), fused AdamW (``train.step.build_optimizer``), the
learning-rate schedule (``train.schedules``), the checkpointer and the log window with its metrics logger and
non-finite guard. As in pretraining, nothing is read back to the host between log steps: the loss and its
finiteness stay on the device, a non-finite step is skipped by AdamW's ``found_inf``, and the log window reads
them back every ``LOG_EVERY`` steps and at the end of each epoch.
"""
import dataclasses
import logging
import os
import time

import torch
import torch.nn.functional as F

from ..eval.progress import progress_bar
from ..models import build_iwm
from ..train import checkpoint as ckpt
from ..train.checkpointer import Checkpointer
from ..train.guard import NonFiniteGuard
from ..train.log_window import LogWindow
from ..train.metrics import MetricsLogger
from ..train.parallel import parallelize_blocks
from ..train.schedules import lr_at
from ..train.step import build_optimizer, mean_over_ranks, set_optimizer_schedule, trusted_indices
from .models import EncoderClassifier, PredictorClassifier, trainable_params

log = logging.getLogger("iwm_fast")

LOG_EVERY = 10  # steps per log window: one host read of the window's losses, one progress-bar update


def build_classifier(args, cfg, model, num_classes):
    """The protocol's classifier around the pretrained ``model``'s parts; ``--predictor-init random`` takes the
    predictor of ``build_iwm`` with another seed (the paper's control: same architecture, no world model)."""
    if args.protocol == "predictor":
        predictor = model.predictor
        if args.predictor_init == "random":
            predictor = build_iwm(cfg, seed=args.seed + 1).predictor
        return PredictorClassifier(model.target_encoder, predictor, num_classes)
    return EncoderClassifier(model.target_encoder.requires_grad_(True), num_classes)


def schedule_at(step, *, total, args):
    """The step's learning rate (linear warm-up over a tenth of the steps, cosine to 0) and weight decay."""
    lr = lr_at(step, total=total, warmup=max(1, total // 10), start_lr=0.0, peak_lr=args.lr, final_lr=0.0)
    return {"lr": lr, "wd": args.weight_decay, "momentum": ""}


def finetune_step(net, optimizer, images, labels, *, lr, wd, device):
    """Cross-entropy, backward and fused AdamW on one batch; returns ``(loss, finite)``, 0-d device tensors (the
    loss averaged over ranks). A non-finite loss leaves the weights and optimizer state as they were, on every
    rank, without a host read."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    set_optimizer_schedule(optimizer, lr, wd)
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(images), labels)
    loss.backward()
    mean = mean_over_ranks(loss.detach().clone())
    finite = torch.isfinite(mean)
    optimizer.found_inf = (~finite).float()  # fused AdamW leaves parameters and state untouched where 1
    optimizer.step()
    return mean, finite


@torch.no_grad()
def recompute_norm_stats(net, x, batch_size, device, max_images=512):
    """Set the head's BatchNorm statistics from the current weights on the first ``max_images`` training images.

    Its running averages lag behind a network that is still changing, and after a short run they still hold
    much of their initial variance of 1 (0.9 ** 46 after two digits epochs), which swamps the ~1e-5 variance of
    a predictor's pooled output. Every rank uses the same images, so their statistics agree.
    """
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was = net.training
    net.train()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    for s in range(0, min(max_images, x.shape[0]), batch_size):
        net(x[s:s + batch_size].to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    net.train(was)


@torch.no_grad()
def accuracy(net, x, y, batch_size, device):
    """Top-1 accuracy on (x, y), counted on the device and read once."""
    was = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for s in range(0, x.shape[0], batch_size):
        logits = net(x[s:s + batch_size].to(device))
        correct += (logits.argmax(1) == y[s:s + batch_size].to(device)).sum()
    net.train(was)
    return correct.item() / x.shape[0]


@dataclasses.dataclass
class ClassifierTraining:
    """The epochs of one fine-tuning: its classifier, optimizer, data and components, in the engine's order."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    checkpointer: Checkpointer
    args: object             # FinetuneArgs
    data: tuple              # (x_train, y_train, x_val, y_val), float images in [0, 1]
    steps_per_epoch: int
    rank: int
    world: int
    device: torch.device
    max_bad_steps: int
    pretrain: dict = None    # the pretraining checkpoint fine-tuned (``RunDir.checkpoint_record``)
    writable: bool = True    # False: a read-only run directory, no checkpoints or metrics

    @property
    def total(self):
        return self.steps_per_epoch * self.args.epochs

    def resume(self):
        """(first epoch to train, validation accuracies so far) from the newest fine-tuning checkpoint, if any."""
        if self.checkpointer.latest is None or not self._same_pretraining():
            return 0, []
        meta = self.checkpointer.resume(self.net, self.optimizer)
        if meta.get("args") != dataclasses.asdict(self.args):
            raise ValueError(f"{self.checkpointer.run.path} holds a fine-tuning with other settings "
                             f"({meta.get('args')}); delete it or give the same options")
        if self.rank == 0:
            log.info("resumed %s from %s (epoch %d)", self.args.name, self.checkpointer.latest, meta["epoch"])
        return meta["epoch"], meta["val_accuracy"]

    def _same_pretraining(self):
        """Whether the newest checkpoint fine-tunes the pretraining checkpoint loaded now; if not (pretraining
        moved on, or the run was retrained), its checkpoints are of stale work: say so and start afresh."""
        saved = ckpt.read_meta(self.checkpointer.latest).get("pretrain")
        if saved == self.pretrain:
            return True
        if self.rank == 0:
            was = f"the step-{saved['step']} pretraining checkpoint" if isinstance(saved, dict) and "step" in saved \
                else "a pretraining checkpoint it does not record"
            log.warning("%s in %s fine-tuned %s, not the run's newest (step %d): starting afresh", self.args.name,
                        self.checkpointer.run.path, was, self.pretrain["step"])
        if self.writable:
            self.checkpointer.discard()
        self.checkpointer.latest = None
        return False

    def open_window(self, start_step):
        run = self.checkpointer.run
        if self.writable:
            os.makedirs(run.path, exist_ok=True)
        bar = progress_bar(self.total, self.args.name, "step", enabled=self.rank == 0)
        bar.update(start_step)
        logger = MetricsLogger(run, enabled=self.rank == 0 and self.writable, resume_step=start_step)
        return LogWindow(logger=logger, bar=bar,
                         guard=NonFiniteGuard(self.max_bad_steps, self.checkpointer.dir), device=self.device,
                         world_size=self.world, peak_flops=None, model=self.net)

    def epoch(self, epoch, window):
        """One pass over the training images in the epoch's seeded order, each rank its share of every batch."""
        xtr, ytr = self.data[0], self.data[1]
        bs, n = self.args.batch_size, self.steps_per_epoch
        perm = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(self.args.seed * 1000 + epoch))
        for i in range(n):
            step = epoch * n + i  # 0-based
            t0 = time.perf_counter()
            rows = perm[i * bs:(i + 1) * bs][self.rank::self.world]
            images, labels = xtr[rows], ytr[rows]
            data_s = time.perf_counter() - t0
            s = schedule_at(step, total=self.total, args=self.args)
            loss, finite = finetune_step(self.net, self.optimizer, images, labels, lr=s["lr"], wd=s["wd"],
                                         device=self.device)
            window.add(step + 1, loss, finite, s, images=rows.numel(), data_s=data_s, ctx_tokens=None,
                       tgt_shape=None)
            if (step + 1) % LOG_EVERY == 0 or i == n - 1:
                window.flush()

    def validate(self, epoch, history):
        """Validation accuracy after ``epoch`` (its head statistics recomputed first), then a checkpoint."""
        xtr, _, xva, yva = self.data
        recompute_norm_stats(self.net, xtr, self.args.batch_size, self.device)
        history.append(accuracy(self.net, xva, yva, self.args.batch_size, self.device))
        if self.rank == 0:
            log.info("%s epoch %d/%d: validation accuracy %.4f", self.args.name, epoch + 1, self.args.epochs,
                     history[-1])
        if self.writable:
            self.checkpointer.save((epoch + 1) * self.steps_per_epoch, self.net, self.optimizer,
                                   {"epoch": epoch + 1, "args": dataclasses.asdict(self.args),
                                    "val_accuracy": history, "pretrain": self.pretrain})


def _close(window):
    try:
        window.flush()  # whatever a failure left in the window is still logged
    except Exception as err:  # the failure being raised is the one to report
        log.debug("log window not flushed: %s", err)
    window.bar.close()
    window.logger.close()


def steps_per_epoch(args, num_images, world):
    if args.batch_size % world:
        raise ValueError(f"batch size {args.batch_size} must be divisible by the {world} ranks")
    if args.batch_size > num_images:
        raise ValueError(f"batch size {args.batch_size} exceeds the {num_images} training images")
    return num_images // args.batch_size


def train_classifier(run, args, cfg, model, data, num_classes, rank, world, device, *, pretrain=None,
                     writable=True):
    """Fine-tune ``args.protocol``'s classifier on ``data`` into ``run.finetune_run(args.name)``, resuming there
    when its checkpoint fine-tunes the same pretraining checkpoint ``pretrain``; ``writable=False`` saves nothing.

    Returns ``(validation accuracy per epoch, trainable parameters, the sharded classifier, total steps)``."""
    per_epoch = steps_per_epoch(args, data[0].shape[0], world)
    torch.manual_seed(args.seed)  # the head's init (after the checkpoint load restored pretraining's RNG)
    net = build_classifier(args, cfg, model, num_classes)
    n_params = trainable_params(net)
    net = parallelize_blocks(net.to(device), device=device, world_size=world)
    optimizer = build_optimizer(net, lr=args.lr)
    checkpointer = Checkpointer(run.finetune_run(args.name), every=per_epoch, total_steps=per_epoch * args.epochs,
                                keep=1, rank=rank)
    job = ClassifierTraining(net, optimizer, checkpointer, args, data, per_epoch, rank, world, device,
                             cfg.train.max_bad_steps, pretrain, writable)
    start_epoch, history = job.resume()
    window = job.open_window(start_epoch * per_epoch)
    net.train()
    try:
        with trusted_indices():  # the predictor gathers its positional embeddings with arange indices
            for epoch in range(start_epoch, args.epochs):
                job.epoch(epoch, window)
                job.validate(epoch, history)
    finally:
        _close(window)
    return history, n_params, net, job.total
