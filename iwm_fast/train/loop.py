"""The training loop: the same code on one CPU process, under torchrun, and on many GPU nodes.

It only orders the components: the model and optimizer (``build``), the data stream and its prefetcher, the
step (``step``), the log window and its non-finite guard, the checkpointer, the profiler and the SIGTERM stop.
Nothing is read back to the host between log steps.
"""
import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from ..run_dir import RunDir
from ..run_lock import lock_run
from .build import build_training
from .checkpointer import Checkpointer
from .collapse import CollapseMonitor, first_logged_rank
from .data import BatchStream, rows_in_step
from .distributed import init_distributed
from .finish import finish, outdated_outputs
from .guard import NonFiniteGuard, NonFiniteLossError  # noqa: F401  (NonFiniteLossError: the CLI's to catch)
from .log_window import LogWindow
from .metrics import MetricsLogger, check_metrics_file, peak_flops, progress_bar
from .prefetch import DevicePrefetcher
from .profiling import Profiler
from .resume import check_resumable
from .schedules import schedules_at
from .step import make_inputs, train_step, trusted_indices
from .stop_signal import StopSignal

log = logging.getLogger("iwm_fast")


def _micro_batch(cfg, world):
    t = cfg.train
    if t.batch_size % (world * t.accum_steps):
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by world size {world} x "
                         f"train.accum_steps={t.accum_steps}")
    return t.batch_size // (world * t.accum_steps)


def _sum_over_ranks(n, device):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n
    total = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def train(cfg, *, loss_hook=None, max_steps=None, backends=None):
    """Train (or resume) the run in ``cfg.train.out_dir``; returns the run directory.

    ``loss_hook(step, loss) -> loss`` lets tests inject faults; ``max_steps`` stops early, as a kill would;
    ``backends`` (``iwm_fast.backends.Backends``) swaps implementations, as the benchmark does.
    """
    cfg.validate()  # load_config did for the CLI; a Config built in Python is checked here
    rank, world, device = init_distributed(cfg.train.device)
    micro = _micro_batch(cfg, world)
    run = RunDir(cfg.train.out_dir)
    # One writer per run directory, taken before anything is read from it or written to it.
    with lock_run(run, "iwm-train", rank) as lock, trusted_indices():  # every index is our mask sampler's
        if lock.read_only:
            raise PermissionError(f"train.out_dir {run.path} cannot be written (permission denied or a "
                                  "read-only file system)")
        return _train(cfg, run, rank, world, device, micro, loss_hook=loss_hook, max_steps=max_steps,
                      backends=backends)


def _train(cfg, run, rank, world, device, micro, *, loss_hook, max_steps, backends):
    t = cfg.train
    checkpointer = Checkpointer(run, every=t.checkpoint_every, total_steps=t.steps, keep=t.keep_checkpoints,
                                rank=rank)
    if checkpointer.latest is not None:
        check_resumable(cfg, run)
    if rank == 0:
        check_metrics_file(run.metrics_path)  # another tool's metrics.csv is not ours to rewrite
    training = build_training(cfg, device=device, world_size=world, backends=backends)
    meta = checkpointer.resume(training.model, training.optimizer)  # a refused (strict) load keeps config.yaml
    if rank == 0:
        run.write_config(cfg)
    start_step = meta["step"] if meta else 0
    if start_step >= t.steps:
        return _complete_finished(cfg, run, training.model, rank, checkpointer.latest)
    if meta and rank == 0:
        log.info("resumed from %s at step %d", checkpointer.latest, start_step)
    loop = _Loop(cfg, run, rank, world, device, micro, training, checkpointer, meta, loss_hook)
    end = t.steps if max_steps is None else min(t.steps, max_steps)
    try:
        step = loop.train_steps(start_step, end)
    finally:
        loop.close()
    skipped_images = _sum_over_ranks(loop.skipped_images, device)  # the ranks' counts are of disjoint files
    if skipped_images and rank == 0:
        log.warning("%d unreadable image files were skipped during training", skipped_images)
    if step == t.steps and end == t.steps:
        loop.guard.check_finished(step)
        finish(cfg, training.model, run, rank, checkpointer.latest)
    return run.path


def _complete_finished(cfg, run, model, rank, checkpoint):
    """A rerun of a finished run writes whichever of its outputs is missing or not of its final checkpoint."""
    todo = outdated_outputs(cfg, run, run.checkpoint_record(checkpoint)) if rank == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [todo]
        dist.broadcast_object_list(box, src=0)  # every rank takes part in the export's gather, or none
        todo = box[0]
    if rank == 0:
        log.info("%s already finished its %d steps%s", run.path, cfg.train.steps,
                 f"; writing {', '.join(todo)} (missing, or not of the final checkpoint)" if todo else
                 f"; its evaluation is in {run.eval_path} (iwm-eval re-runs it); "
                 "give another train.out_dir to train again")
    if todo:
        finish(cfg, model, run, rank, checkpoint)
    return run.path


@dataclasses.dataclass
class _Loop:
    """The steps from a start to an end: the components, opened together and closed together, in order."""
    cfg: object
    run: RunDir
    rank: int
    world: int
    device: torch.device
    micro: int
    training: object  # build.Training
    checkpointer: Checkpointer
    meta: dict
    loss_hook: object

    def __post_init__(self):
        t, rank, world, device, meta = self.cfg.train, self.rank, self.world, self.device, self.meta
        start = meta["step"] if meta else 0
        # This rank's unreadable files; the checkpoint holds all ranks' total, which rank 0 carries on.
        self.skipped_images = meta.get("skipped_images", 0) if meta and rank == 0 else 0
        self.data = DevicePrefetcher(BatchStream(self.cfg, rank=rank, world_size=world, micro_batch=self.micro,
                                                 start_state=meta["data"] if meta else None), device)
        self.logger = MetricsLogger(self.run, enabled=rank == 0, resume_step=start)
        self.bar = progress_bar(t.steps, start=start, enabled=rank == 0)
        self.guard = NonFiniteGuard(t.max_bad_steps, self.checkpointer.dir)
        model = self.training.model
        self.collapse = CollapseMonitor(model, enabled=rank == 0,
                                        reference=first_logged_rank(self.logger.path, start) if rank == 0 else None)
        self.window = LogWindow(logger=self.logger, bar=self.bar, guard=self.guard, device=device, world_size=world,
                                peak_flops=peak_flops(device), model=model, collapse=self.collapse)
        self.profiler = Profiler(self.cfg.profile and rank == 0, self.run)
        self.stop = StopSignal(t.term_grace_s, device=device, world_size=world)

    def train_steps(self, start_step, end):
        """Steps ``start_step + 1 .. end`` (1-based: the step that is done after each iteration)."""
        step = start_step
        for step in range(start_step + 1, end + 1):
            # Step 1 too: the collapse warning's reference is the model at initialisation.
            with self.collapse.watch(step, step == 1 or self.logs_at(step, end)):
                self.step(step)
            self.profiler.step()
            self.after_step(step, end)
        return step

    def step(self, step):
        """Inputs, forward, backward, update of one step; its loss stays on the device, in the log window."""
        t, micro, training = self.cfg.train, self.micro, self.training
        t0 = time.perf_counter()
        raw = [next(self.data) for _ in range(t.accum_steps)]
        data_s = time.perf_counter() - t0
        self.skipped_images += sum(r["num_skipped"] for r in raw)
        micro_batches = [
            make_inputs(r["images"], rows=rows_in_step(k, micro_batch=micro, rank=self.rank, world_size=self.world,
                                                       batch_positions=r["batch_positions"], device="cpu"),
                        global_batch=micro * self.world * t.accum_steps, grid=training.model.encoder.grid,
                        mask_config=self.cfg.masks, augment=self.cfg.augment, seed=t.seed, step=step - 1,
                        device=self.device, backends=training.backends)
            for k, r in enumerate(raw)]
        s = schedules_at(step - 1, t)
        loss, finite = train_step(training.model, training.optimizer, micro_batches, lr=s["lr"], wd=s["wd"],
                                  momentum=s["momentum"], grad_clip=t.grad_clip, scaler=training.scaler,
                                  backends=training.backends, loss_hook=self.loss_hook, step=step - 1)
        mb = micro_batches[0]
        self.window.add(step, loss, finite, s, images=sum(m.source.shape[0] for m in micro_batches),
                        data_s=data_s, ctx_tokens=mb.ctx_idx.shape[1], tgt_shape=tuple(mb.tgt_idx.shape[1:]))

    def logs_at(self, step, end):
        return self.checkpointer.is_save_step(step) or step % self.cfg.train.log_every == 0 or step == end

    def after_step(self, step, end):
        """Log at log steps, save at save steps (never after a non-finite step), stop on SIGTERM."""
        checkpointer, guard = self.checkpointer, self.guard
        save = checkpointer.is_save_step(step)
        at_log = self.logs_at(step, end)
        stopping = self.stop.should_stop(at_log)
        if at_log or stopping:
            self.window.flush()
        if (save or stopping) and guard.bad_run:
            log.warning("step %d: no checkpoint after a non-finite step; the last one stays %s", step,
                        checkpointer.latest)
        elif save or stopping:
            checkpointer.save(step, self.training.model, self.training.optimizer,
                              {"data": self.data.state_dict(),
                               "skipped_images": _sum_over_ranks(self.skipped_images, self.device)})
        if stopping:  # at the last step too: the export and evaluation are left to a rerun
            raise self.stop.stopped(step, checkpointer.latest, final=step == self.cfg.train.steps and not guard.bad_run)

    def close(self):
        try:
            self.window.flush()  # whatever a failure left in the window is still logged
        except Exception as err:  # the failure being raised is the one to report
            log.debug("log window not flushed: %s", err)
        self.bar.close()
        self.logger.close()
        self.profiler.close()
        self.stop.close()
        self.data.close()
