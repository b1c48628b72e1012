"""End-to-end training-step benchmark: images/s and a per-phase step-time breakdown on one device.

It times the engine's own training step: the model and optimizer come from ``iwm_fast.train.build`` (the
model factory, FSDP2 over a one-process group, fused AdamW, the run's precision), the inputs from
``iwm_fast.train.step.make_inputs`` and the step from ``iwm_fast.train.step.train_step``. The four
configurations differ only in their ``iwm_fast.backends.Backends`` value and the compile flag:

  (a) I-JEPA-style eager: attention with the score matrix materialised, gather on a repeated index + cat,
      the per-parameter EMA loop, masks sampled on the CPU by I-JEPA's per-sample algorithm inside the step;
  (b) PyTorch best practice: SDPA, torch.gather on an expanded index, ``_foreach_lerp_``, every block compiled
      (``dynamic=True``: the masks change the token counts every step); its CPU masks are sampled before timing
      (as DataLoader workers would, overlapped), only their copy is timed;
  (c) iwm-fast: the engine's defaults (Triton attention and gather on CUDA, the fused EMA, our mask sampler);
  (d) (c) with every block compiled.

Cases: ViT-B/16 and ViT-H/14 (224 px) with the ``iwm-equi`` and ``ijepa`` predictor presets.

Throughput: steps run back to back with no host sync, as the engine runs them between log steps; each window of
``Steps.window`` steps ends with one sync and the read-back of its losses (the engine's log step), and
images/s = batch / (window time / window steps); medians and p20/p80 over windows. The breakdown is a separate
run whose phase timer (CUDA events) marks the step's phases; its predictor/context-encoder backward split is
an event recorded by a gradient hook on the context tokens. Compile time (warmup wall time beyond warmup x the
steady step time) is reported on its own, not in images/s. The masked gather's index check is off, as in
training (``iwm-train`` turns it off unless IWM_FAST_INDEX_CHECK is set). Rows are yielded as each configuration
finishes, the speedups as soon as both of their configurations have run; the quick set is one case,
ViT-H/14 IWM-Equi at batch 128, with the eager configurations first.
"""
import argparse
import dataclasses
import gc
import time

import torch

from ..backends import Backends
from . import harness

NOTES = []  # "skipped: ..." lines for the runner's summary, filled by run()


@dataclasses.dataclass(frozen=True)
class Case:
    model: str          # label, e.g. "vit_h14"
    size: str           # iwm_fast.models.VIT_SIZES key
    patch: int
    mode: str           # predictor preset: "iwm-equi" or "ijepa"
    batch: int
    img: int = 224
    tiny: bool = False  # the CPU smoke model: 2 encoder blocks, a 2 x 48 predictor


@dataclasses.dataclass(frozen=True)
class Config:
    label: str
    backends: Backends
    compile: bool = False
    prefetched_masks: bool = False  # sampled before timing, as DataLoader workers would


CONFIGS = {
    "a_ijepa_eager": Config("(a) I-JEPA-style eager",
                            Backends(attention="eager", gather="ijepa", ema="loop", masks="ijepa")),
    "b_pytorch_compile": Config("(b) PyTorch best practice + compile",
                                Backends(attention="sdpa", gather="torch", ema="foreach", masks="ijepa"),
                                compile=True, prefetched_masks=True),
    "c_iwm_fast": Config("(c) iwm-fast kernels", Backends()),
    "d_iwm_fast_compile": Config("(d) iwm-fast kernels + compile", Backends(), compile=True),
}

CUDA_CASES = [Case("vit_h14", "huge", 14, "iwm-equi", 128), Case("vit_b16", "base", 16, "iwm-equi", 128),
              Case("vit_b16", "base", 16, "ijepa", 128), Case("vit_h14", "huge", 14, "ijepa", 128)]
CPU_CASES = [Case("vit_tiny8", "tiny", 8, "iwm-equi", 4, img=96, tiny=True)]

PHASES = ("data", "target_encoder", "context_fwd", "predictor_fwd", "predictor_bwd", "context_bwd",
          "optimizer", "ema")


QUICK_ORDER = ("a_ijepa_eager", "c_iwm_fast", "b_pytorch_compile", "d_iwm_fast_compile")  # compiles last


@dataclasses.dataclass(frozen=True)
class Steps:
    warmup: int
    windows: int
    window: int         # steps per timed window (one sync at its end)
    breakdown: int


def steps(device, quick):
    if torch.device(device).type != "cuda":
        return Steps(warmup=2, windows=2, window=1, breakdown=1)
    return Steps(3, 3, 2, 1) if quick else Steps(5, 5, 4, 5)


def case_config(case, config):
    """The run config of ``case`` under ``config``: what ``iwm-train`` would be given."""
    from ..config import load_config

    overrides = [f"model.size={case.size}", f"model.patch_size={case.patch}", f"data.image_size={case.img}",
                 f"predictor.preset={case.mode}", f"train.batch_size={case.batch}", "train.seed=0",
                 f"train.loss={'smooth_l1' if case.mode == 'ijepa' else 'l2'}", f"train.compile={config.compile}"]
    if case.tiny:
        overrides += ["model.depth=2", "predictor.depth=2", "predictor.width=48", "masks.min_keep=4"]
    return load_config(None, overrides)


class PhaseTimer:
    """Ordered marks; CUDA events on a GPU, host clock on the CPU."""
    enabled = True

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def mark(self, name):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def phases_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
        self.marks = []
        return out


class Stepper:
    """One configuration's engine step on one case: ``build_training`` + ``make_inputs`` + ``train_step``."""

    def __init__(self, case, config, device, total_steps, seed=0):
        from ..train.build import build_training
        from ..train.distributed import init_distributed
        from ..train.step import sample_masks

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        init_distributed("cuda" if self.cuda else "cpu")
        self.case, self.config, self.seed = case, config, seed
        self.cfg = case_config(case, config)
        # Inductor's CPU code generation would take minutes here; the CPU run checks the plumbing only.
        self.run = build_training(self.cfg, device=self.device, world_size=1, backends=config.backends,
                                  compile_backend="inductor" if self.cuda else "eager")
        self.grid = self.run.model.encoder.grid
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (case.batch, 3, case.img, case.img), dtype=torch.uint8, generator=g)
        self.images = images.pin_memory() if self.cuda else images
        self.rows = torch.arange(case.batch)
        self.prefetched = {}
        if config.prefetched_masks:  # produced off the critical path, as by DataLoader workers
            for s in range(total_steps):
                ctx, tgt = sample_masks(case.batch, self.grid, self.cfg.masks, seed=seed, step=s, device=self.device,
                                        backend=config.backends.masks)
                self.prefetched[s] = (ctx.pin_memory(), tgt.pin_memory()) if self.cuda else (ctx, tgt)

    def step(self, step, timer):
        from ..train.step import NO_TIMER, make_inputs, train_step

        timer = timer or NO_TIMER
        timer.mark("start")
        mb = make_inputs(self.images, rows=self.rows, global_batch=self.case.batch, grid=self.grid,
                         mask_config=self.cfg.masks, augment=self.cfg.augment, seed=self.seed, step=step,
                         device=self.device, backends=self.config.backends, masks=self.prefetched.get(step))
        timer.mark("data")
        loss, _ = train_step(self.run.model, self.run.optimizer, [mb], lr=1e-4, wd=0.04, momentum=0.996,
                             scaler=self.run.scaler, backends=self.config.backends, step=step, timer=timer)
        return loss


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(case, config, device, b):
    """Throughput and breakdown of one configuration. Returns a dict of measurements."""
    total = b.warmup + b.windows * b.window + b.breakdown
    t0 = time.perf_counter()
    stepper = Stepper(case, config, device, total)
    setup_s = time.perf_counter() - t0
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for s in range(b.warmup):
        loss = stepper.step(s, None)
        _sync(device)
    warm_s = time.perf_counter() - t0
    times, s = [], b.warmup
    for _ in range(b.windows):
        t0 = time.perf_counter()
        losses = [stepper.step(s + k, None) for k in range(b.window)]
        torch.stack(losses).cpu()  # the engine's log step: one read-back of the window's losses
        times.append((time.perf_counter() - t0) * 1e3 / b.window)
        s += b.window
    loss = losses[-1]
    phases = {p: [] for p in PHASES}
    for k in range(b.breakdown):
        timer = PhaseTimer(device)
        stepper.step(s + k, timer)
        for name, ms in timer.phases_ms().items():
            phases.setdefault(name, []).append(ms)
    stats = harness._quantiles(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")
    compile_s = max(0.0, warm_s - b.warmup * stats[0] * 1e-3) if config.compile else 0.0
    out = {"step_ms": stats, "phases": {k: harness._quantiles(v) for k, v in phases.items() if v},
           "compile_s": compile_s, "setup_s": setup_s, "peak_mem_gib": peak, "loss": float(loss)}
    del stepper
    return out


def _cleanup(compiled):
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _config_rows(case, name, shape, dtype, b, device, meta):
    """The rows of one configuration (its images/s row first), or [] with a note when it failed."""
    config = CONFIGS[name]
    try:
        m = measure(case, config, device, b)
    except Exception as exc:  # one configuration failing (OOM, compile error) must not stop the rest
        NOTES.append(f"FAILED: e2e {shape} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                     if str(exc) else f"FAILED: e2e {shape} {name}: {type(exc).__name__}")
        return []
    finally:
        _cleanup(config.compile)
    step = m["step_ms"]
    rows = [harness.row("e2e", name, shape, dtype, "images_per_s", harness.rate(case.batch, step, 1.0), meta),
            harness.row("e2e", name, shape, dtype, "step_ms", step, meta)]
    rows += [harness.row("e2e", name, shape, dtype, f"phase_ms:{phase}", st, meta) for phase, st in m["phases"].items()]
    rows.append(harness.row("e2e", name, shape, dtype, "compile_s", (m["compile_s"],) * 3, meta))
    rows.append(harness.row("e2e", name, shape, dtype, "peak_mem_gib", (m["peak_mem_gib"],) * 3, meta))
    print(f"e2e {shape:28s} {name:20s} {rows[0]['median']:9.1f} images/s  step {step[0]:8.1f} ms"
          + (f"  compile {m['compile_s']:.0f} s" if config.compile else ""), flush=True)
    return rows


def run(device, quick, cases=None, configs=None):
    from ..ops.gather import get_index_check, set_index_check

    NOTES.clear()
    meta = harness.metadata(device)
    b = steps(device, quick)
    cuda = torch.device(device).type == "cuda"
    if cases is None:
        cases = CPU_CASES if not cuda else (CUDA_CASES[:1] if quick else CUDA_CASES)
    if not cuda:
        NOTES.append("note: e2e on the CPU: 'auto' backends run the PyTorch paths (Triton runs on CUDA only "
                     "here), so (c) and (d) check the plumbing, not the kernels")
    names = list(configs or (QUICK_ORDER if quick else CONFIGS))
    dtype = "bfloat16" if cuda else "float32"
    check = get_index_check()
    set_index_check("off")  # as iwm-train runs: no host read of the indices in the step
    try:
        for case in cases:
            shape = f"{case.model}/{case.mode}/B{case.batch}"
            throughput = {}
            for name in names:
                rows = _config_rows(case, name, shape, dtype, b, device, meta)
                yield from rows
                if rows:
                    throughput[name] = rows[0]
                    yield from speedup_rows(throughput, meta, newest=name)
    finally:
        set_index_check(check)
    failed = [n for n in NOTES if n.startswith("FAILED")]
    if failed:  # after every other configuration has run and yielded its rows
        raise RuntimeError(f"{len(failed)} e2e configuration(s) failed: " + "; ".join(failed))


def speedup_rows(throughput, meta, newest=None):
    """images/s of each configuration over (a)'s and over (b)'s, measured in the same run (p20/p80: the
    configuration's own spread over the baseline's median): c/a, d/a, c/b, d/b, b/a. With ``newest``, only the
    ratios that configuration completes."""
    out = []
    for base in ("a_ijepa_eager", "b_pytorch_compile"):
        if base not in throughput:
            continue
        ref = throughput[base]["median"]
        for name, r in throughput.items():
            if name <= base or newest not in (None, name, base):
                continue
            stats = (r["median"] / ref, r["p20"] / ref, r["p80"] / ref)
            out.append(harness.row("e2e", name, r["shape"], r["dtype"], f"speedup_vs_{base}", stats, meta))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="End-to-end IWM training-step benchmark (the engine's own step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", default=None)
    p.add_argument("--configs", default=None, help="comma-separated subset of " + ",".join(CONFIGS))
    a = p.parse_args(argv)
    configs = a.configs.split(",") if a.configs else None
    rows = list(run(a.device, a.quick, configs=configs))
    for n in NOTES:
        print(n)
    if a.csv:
        harness.write_csv(rows, a.csv)
    return rows


if __name__ == "__main__":
    main()
