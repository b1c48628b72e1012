"""The training loop: the same code on one CPU process, under torchrun, and on many GPU nodes."""
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from ..models import build_iwm
from ..ops.gather import set_index_check
from . import checkpoint as ckpt
from .config import save_config
from .data import BatchStream, rows_in_step
from .metrics import MetricsLogger, ProgressBar, peak_flops, step_flops
from .parallel import parallelize, resolve_precision
from .resume import check_resumable
from .schedules import schedules_at
from .step import build_optimizer, make_inputs, train_step

log = logging.getLogger("iwm_fast")


class NonFiniteLossError(RuntimeError):
    pass


def init_distributed(device_pref="auto"):
    """Join torchrun's process group if there is one, else start a one-process gloo group."""
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if not dist.is_initialized():
        backend = "nccl" if device_pref == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:  # a single process: an in-memory store, no port to pick or collide on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_pref == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _check_batching(cfg, world):
    t = cfg.train
    if t.batch_size % (world * t.accum_steps):
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by world size {world} x "
                         f"train.accum_steps={t.accum_steps}")
    return t.batch_size // (world * t.accum_steps)


def train(cfg, *, loss_hook=None, max_steps=None):
    """Train (or resume) the run in ``cfg.train.out_dir``; returns the run directory.

    ``loss_hook(step, loss) -> loss`` lets tests inject faults; ``max_steps`` stops early, as a kill would.
    """
    rank, world, device = init_distributed(cfg.train.device)
    if device.type == "cuda" and "IWM_FAST_INDEX_CHECK" not in os.environ:
        # Every index comes from our own mask sampler, in range by construction (and tested): skip the
        # per-gather host sync of the bounds check. IWM_FAST_INDEX_CHECK=host brings it back for debugging.
        set_index_check("off")
    t = cfg.train
    run_dir = t.out_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    precision = resolve_precision(t.precision, device)
    micro = _check_batching(cfg, world)
    last = ckpt.latest_checkpoint(ckpt_dir)
    if last is not None:
        check_resumable(cfg, run_dir)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))

    model = build_iwm(cfg).to(device)
    grid = model.encoder.grid
    model = parallelize(model, device=device, world_size=world, precision=precision, compile_blocks=t.compile,
                        activation_checkpointing=t.activation_checkpointing)
    optimizer = build_optimizer(model, lr=t.lr, device=device)
    scaler = None
    if precision == "fp16":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        scaler = ShardedGradScaler()

    start_step, skipped_images, bad_steps = 0, 0, 0
    if last is not None:
        meta = ckpt.load_checkpoint(last, model, optimizer)
        start_step, skipped_images = meta["step"], meta.get("skipped_images", 0)
        if start_step >= t.steps:
            if rank == 0:
                log.info("%s already finished its %d steps; its evaluation is in %s (iwm-eval re-runs it); "
                         "give another train.out_dir to train again", run_dir, t.steps,
                         os.path.join(run_dir, "eval.json"))
            return run_dir
        if rank == 0:
            log.info("resumed from %s at step %d", last, start_step)
    data = BatchStream(cfg, rank=rank, world_size=world, micro_batch=micro,
                       start_state=meta["data"] if last is not None else None)

    logger = MetricsLogger(run_dir, enabled=rank == 0, resume_step=start_step)
    bar = ProgressBar(t.steps, start=start_step, enabled=rank == 0, every=t.log_every)
    peak = peak_flops(device)
    profiler = _maybe_profiler(cfg, run_dir, rank)
    end = t.steps if max_steps is None else min(t.steps, max_steps)
    step = start_step
    try:
        for step in range(start_step, end):
            t_start = time.perf_counter()
            raw = [next(data) for _ in range(t.accum_steps)]
            t_data = time.perf_counter() - t_start
            skipped_images += sum(r["num_skipped"] for r in raw)
            global_batch = micro * world * t.accum_steps
            micro_batches = []
            for k, r in enumerate(raw):
                rows = rows_in_step(k, micro_batch=micro, rank=rank, world_size=world,
                                    batch_positions=r["batch_positions"], device=device)
                micro_batches.append(make_inputs(r["images"], rows=rows, global_batch=global_batch, grid=grid,
                                                 cfg=cfg, seed=t.seed, step=step, device=device))
            s = schedules_at(step, t)
            loss, skipped = train_step(model, optimizer, micro_batches, lr=s["lr"], wd=s["wd"],
                                       momentum=s["momentum"], grad_clip=t.grad_clip, scaler=scaler,
                                       loss_hook=loss_hook, step=step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t_start
            n_images = sum(mb.source.shape[0] for mb in micro_batches) * world
            row = {"step": step + 1, "loss": loss, "lr": s["lr"], "wd": s["wd"], "momentum": s["momentum"],
                   "images_per_s": n_images / dt, "step_time_s": dt, "data_wait_frac": t_data / dt,
                   "peak_mem_mb": _peak_mem_mb(device), "skipped": int(skipped), "mfu": ""}
            if peak is not None:
                _, M, Nt = micro_batches[0].tgt_idx.shape
                Nc = micro_batches[0].ctx_idx.shape[1]
                if model.predictor.target_mode == "per_block":  # one sequence per (sample, block)
                    flops = step_flops(model, n_images, Nc, n_images * M, Nc + Nt)
                else:
                    flops = step_flops(model, n_images, Nc, n_images, Nc + M * Nt)
                row["mfu"] = flops / dt / (peak * world)
            logger.log(row)
            bar.update(step + 1, loss, row["images_per_s"])
            if profiler is not None:
                profiler.step()
            if skipped:
                bad_steps += 1
                log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", step + 1, loss, bad_steps)
                if bad_steps >= t.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{bad_steps} consecutive steps had a non-finite loss (last at step {step + 1}); "
                        f"stopping. The last good checkpoint is kept in {ckpt_dir}")
                continue
            bad_steps = 0
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
                ckpt.save_checkpoint(ckpt_dir, step + 1, model, optimizer,
                                     {"data": data.state_dict(), "skipped_images": skipped_images},
                                     keep=t.keep_checkpoints)
    finally:
        bar.close()
        logger.close()
        if profiler is not None:
            _finish_profiler(profiler, run_dir)
        data.close()
    if skipped_images and rank == 0:
        log.warning("%d unreadable image files were skipped during training", skipped_images)
    if step + 1 == t.steps and end == t.steps:
        _finish(cfg, model, run_dir, rank)
    return run_dir


def _peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        return float("nan")


def _finish(cfg, model, run_dir, rank):
    """Export the target encoder, then evaluate (rank 0) and print the summary."""
    state = ckpt.full_model_state(model)
    if rank == 0:
        ckpt.export_target_encoder(state, os.path.join(run_dir, "target_encoder.pt"))
        if cfg.eval.enabled:
            from .evaluate import evaluate_run
            evaluate_run(run_dir, cfg=cfg, model_state=state)
    if dist.is_initialized():
        dist.barrier()


def _maybe_profiler(cfg, run_dir, rank):
    if not cfg.profile or rank != 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1), record_shapes=True)
    prof.start()
    return prof


def _finish_profiler(prof, run_dir):
    prof.stop()
    trace = os.path.join(run_dir, "profile_trace.json")
    prof.export_chrome_trace(trace)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    with open(os.path.join(run_dir, "profile_kernels.txt"), "w") as f:
        f.write(table)
    print(f"[iwm-fast] profiler trace: {trace} (open in Perfetto or chrome://tracing)", file=sys.stderr)
