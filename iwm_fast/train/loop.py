"""The training loop: the same code on one CPU process, under torchrun, and on many GPU nodes.

It only orders the components: the model and optimizer (``build``), the data stream and its prefetcher, the
step (``step``), the log window and its non-finite guard, the checkpointer, the profiler and the SIGTERM stop.
Nothing is read back to the host between log steps.
"""
import logging
import os
import time

import torch
import torch.distributed as dist

from ..ops.gather import get_index_check, set_index_check
from .build import build_training
from .checkpointer import Checkpointer
from ..config import save_config
from .data import BatchStream, rows_in_step
from .distributed import init_distributed
from .finish import finish, missing_outputs
from .guard import NonFiniteGuard, NonFiniteLossError  # noqa: F401  (NonFiniteLossError: the CLI's to catch)
from .log_window import LogWindow
from .metrics import MetricsLogger, peak_flops, progress_bar
from .prefetch import DevicePrefetcher
from .profiling import Profiler
from .resume import check_resumable
from .schedules import schedules_at
from .step import make_inputs, train_step
from .stop_signal import StopRequested, StopSignal

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
    # Every index comes from our own mask sampler, in range by construction (and tested): skip the bounds
    # check's host read while training (the caller's setting comes back after). IWM_FAST_INDEX_CHECK=host keeps
    # it on for debugging.
    index_check = get_index_check()
    if "IWM_FAST_INDEX_CHECK" not in os.environ:
        set_index_check("off")
    try:
        return _train(cfg, rank, world, device, loss_hook=loss_hook, max_steps=max_steps, backends=backends)
    finally:
        set_index_check(index_check)


def _train(cfg, rank, world, device, *, loss_hook, max_steps, backends):
    t = cfg.train
    run_dir = t.out_dir
    micro = _micro_batch(cfg, world)
    checkpointer = Checkpointer(run_dir, every=t.checkpoint_every, total_steps=t.steps, keep=t.keep_checkpoints,
                                rank=rank)
    if checkpointer.latest is not None:
        check_resumable(cfg, run_dir)

    run = build_training(cfg, device=device, world_size=world, backends=backends)
    model, optimizer = run.model, run.optimizer
    grid = model.encoder.grid
    meta = checkpointer.resume(model, optimizer)  # a refused (strict) load leaves the run's config.yaml as it was
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    start_step = meta["step"] if meta else 0
    # This rank's unreadable files; the checkpoint holds all ranks' total, which rank 0 carries on.
    skipped_images = meta.get("skipped_images", 0) if meta and rank == 0 else 0
    if start_step >= t.steps:
        missing = missing_outputs(cfg, run_dir)
        if rank == 0:
            log.info("%s already finished its %d steps%s", run_dir, t.steps,
                     f"; completing {', '.join(missing)}" if missing else
                     f"; its evaluation is in {os.path.join(run_dir, 'eval.json')} (iwm-eval re-runs it); "
                     "give another train.out_dir to train again")
        if missing:
            finish(cfg, model, run_dir, rank)
        return run_dir
    if meta and rank == 0:
        log.info("resumed from %s at step %d", checkpointer.latest, start_step)

    data = DevicePrefetcher(BatchStream(cfg, rank=rank, world_size=world, micro_batch=micro,
                                        start_state=meta["data"] if meta else None), device)
    logger = MetricsLogger(run_dir, enabled=rank == 0, resume_step=start_step)
    bar = progress_bar(t.steps, start=start_step, enabled=rank == 0)
    guard = NonFiniteGuard(t.max_bad_steps, checkpointer.dir)
    window = LogWindow(logger=logger, bar=bar, guard=guard, device=device, world_size=world,
                       peak_flops=peak_flops(device), model=model, target_mode=model.predictor.target_mode)
    profiler = Profiler(cfg.profile and rank == 0, run_dir)
    stop = StopSignal(t.term_grace_s, device=device, world_size=world)
    end = t.steps if max_steps is None else min(t.steps, max_steps)
    global_batch = micro * world * t.accum_steps
    step = start_step
    try:
        for step in range(start_step + 1, end + 1):  # 1-based: the step that is done after this iteration
            t0 = time.perf_counter()
            raw = [next(data) for _ in range(t.accum_steps)]
            data_s = time.perf_counter() - t0
            skipped_images += sum(r["num_skipped"] for r in raw)
            micro_batches = [
                make_inputs(r["images"], rows=rows_in_step(k, micro_batch=micro, rank=rank, world_size=world,
                                                           batch_positions=r["batch_positions"], device="cpu"),
                            global_batch=global_batch, grid=grid, mask_config=cfg.masks, augment=cfg.augment,
                            seed=t.seed, step=step - 1, device=device, backends=run.backends)
                for k, r in enumerate(raw)]
            s = schedules_at(step - 1, t)
            loss, finite = train_step(model, optimizer, micro_batches, lr=s["lr"], wd=s["wd"],
                                      momentum=s["momentum"], grad_clip=t.grad_clip, scaler=run.scaler,
                                      backends=run.backends, loss_hook=loss_hook, step=step - 1)
            mb = micro_batches[0]
            window.add(step, loss, finite, s, images=sum(m.source.shape[0] for m in micro_batches),
                       data_s=data_s, ctx_tokens=mb.ctx_idx.shape[1], tgt_shape=tuple(mb.tgt_idx.shape[1:]))
            profiler.step()
            save = checkpointer.is_save_step(step)
            at_log = save or step % t.log_every == 0 or step == end
            stopping = stop.should_stop(at_log)
            if at_log or stopping:
                window.flush()
            if (save or stopping) and guard.bad_run:
                log.warning("step %d: no checkpoint after a non-finite step; the last one stays %s", step,
                            checkpointer.latest)
            elif save or stopping:
                checkpointer.save(step, model, optimizer, {"data": data.state_dict(),
                                                           "skipped_images": _sum_over_ranks(skipped_images, device)})
            if stopping and step < t.steps:
                raise StopRequested(step, checkpointer.latest)
    finally:
        try:
            window.flush()  # whatever a failure left in the window is still logged
        except Exception as err:  # the failure being raised is the one to report
            log.debug("log window not flushed: %s", err)
        bar.close()
        logger.close()
        profiler.close()
        stop.close()
        data.close()
    skipped_images = _sum_over_ranks(skipped_images, device)  # the ranks' counts are of disjoint files
    if skipped_images and rank == 0:
        log.warning("%d unreadable image files were skipped during training", skipped_images)
    if step == t.steps and end == t.steps:
        guard.check_finished(step)
        finish(cfg, model, run_dir, rank)
    return run_dir
