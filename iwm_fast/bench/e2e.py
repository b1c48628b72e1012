"""End-to-end training-step benchmark: images/s and a per-phase step-time breakdown on one device.

Cases: ViT-B/16 and ViT-H/14 (224 px) in IWM-Equi (predictor 18x384, feature conditioning, union targets, L2)
and I-JEPA (12x384, no conditioning, per-block targets, smooth-L1) modes. Each case runs four configurations
(``iwm_fast.bench.baselines.IMPLEMENTATIONS``) on the same model, batch and numerics:

  (a) I-JEPA-style eager: naive attention, gather + cat, per-parameter EMA loop, masks sampled on the CPU by
      I-JEPA's per-sample algorithm inside the step and copied to the device;
  (b) PyTorch best practice: SDPA, torch.gather, ``_foreach_lerp_``, ``torch.compile(dynamic=True)`` of every
      block (the masks change the token counts every step, so static shapes would recompile); its CPU
      masks are sampled before timing (as DataLoader workers would, overlapped), only their copy is timed;
  (c) iwm-fast: Triton attention and gather, ``iwm_fast.ops.ema_update_``, masks sampled on the device;
  (d) (c) with ``torch.compile`` of every block.

Setup, the same for all: one process, no FSDP; fp32 master weights, ``torch.autocast`` bf16 on CUDA (fp32 on
the CPU); fused AdamW (``iwm_fast.train.step.build_optimizer``); a fixed uint8 image batch in pinned memory,
copied each step, views made on the device by ``iwm_fast.transforms``. One step = data (copy, views, masks),
target encoder, context encoder forward, predictor forward + loss, backward, AdamW, EMA; a host sync ends it,
as the training loop's loss read-back does.

Two runs per configuration: a throughput run (host clock, one sync per step; images/s = batch / step time)
and a separate breakdown run with CUDA events between phases (the predictor/context-encoder backward split is
an event recorded by a gradient hook on the encoder output). Compile time (warmup wall time beyond
warmup x the steady step time) is reported on its own, not in images/s.
"""
import argparse
import dataclasses
import gc
import time

import torch

from . import harness
from .baselines import IMPLEMENTATIONS, ema_function, ijepa_masks_cpu, use_implementation

NOTES = []  # "skipped: ..." lines for the runner's summary, filled by run()
ROWS_SO_FAR = []  # rows of the configurations finished so far: what a runner stopped at its time limit keeps


@dataclasses.dataclass(frozen=True)
class Case:
    model: str          # label, e.g. "vit_h14"
    size: str           # iwm_fast.models.VIT_SIZES key, or "" for the tiny CPU model
    patch: int
    mode: str           # "iwm-equi" or "ijepa"
    batch: int
    img: int = 224


MODES = {  # predictor depth, width, conditioning, target mode, loss
    "iwm-equi": (18, 384, "feature", "union", "l2"),
    "ijepa": (12, 384, "none", "per_block", "smooth_l1"),
}

CUDA_CASES = [Case("vit_h14", "huge", 14, "iwm-equi", 128), Case("vit_b16", "base", 16, "iwm-equi", 128),
              Case("vit_b16", "base", 16, "ijepa", 128), Case("vit_h14", "huge", 14, "ijepa", 128)]
CPU_CASES = [Case("vit_tiny8", "", 8, "iwm-equi", 4, img=96)]

PHASES = ("data", "target_encoder", "context_fwd", "predictor_fwd", "predictor_bwd", "context_bwd",
          "optimizer", "ema")


@dataclasses.dataclass(frozen=True)
class Budget:
    warmup: int
    steps: int
    breakdown: int
    seconds: float      # wall-clock budget of the whole e2e part; cases past it are skipped with a note


def budget(device, quick):
    if torch.device(device).type != "cuda":
        return Budget(warmup=2, steps=2, breakdown=1, seconds=120.0)
    return Budget(3, 6, 3, 140.0) if quick else Budget(5, 20, 5, 3600.0)


def build(case, device):
    from ..models import IWM, IWMPredictor, VisionTransformer, build_vit
    from ..transforms import ACTION_DIM

    depth, width, cond, target_mode, loss = MODES[case.mode]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: ViT-H/14 on the CPU takes seconds
        if case.size:
            enc = build_vit(case.size, img_size=case.img, patch_size=case.patch)
            pred = IWMPredictor(enc.grid, enc.embed_dim, width, depth=depth, num_heads=enc.num_heads,
                                conditioning=cond, action_dim=ACTION_DIM if cond != "none" else 0,
                                target_mode=target_mode)
        else:  # tiny CPU model for smoke tests
            enc = VisionTransformer(img_size=case.img, patch_size=case.patch, embed_dim=64, depth=2, num_heads=2)
            pred = IWMPredictor(enc.grid, 64, 32, depth=2, num_heads=2, conditioning=cond,
                                action_dim=ACTION_DIM if cond != "none" else 0, target_mode=target_mode)
        model = IWM(enc, pred, loss=loss)
    return model.to(device)  # anything a constructor made on the CPU regardless


class PhaseTimer:
    """Ordered marks; CUDA events on a GPU, host clock on the CPU. ``enabled=False`` makes marks free."""

    def __init__(self, device, enabled):
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = enabled
        self.marks = []

    def mark(self, name):
        if not self.enabled:
            return
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
    """One configuration's training step on one case."""

    def __init__(self, case, impl, device, total_steps, seed=0):
        from ..masks import sample_block_masks
        from ..train.step import build_optimizer

        self.case, self.impl, self.device, self.seed = case, impl, torch.device(device), seed
        self.cuda = self.device.type == "cuda"
        self.model = build(case, device)
        self.grid = self.model.encoder.grid
        self.opt = build_optimizer(self.model, lr=1e-4, device=device)
        self.ema = ema_function(impl.ema)
        self.sample_block_masks = sample_block_masks
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (case.batch, 3, case.img, case.img), dtype=torch.uint8, generator=g)
        if self.cuda:
            self.images = self.images.pin_memory()
        self.prefetched = {}
        if impl.masks == "ijepa_cpu_prefetched":  # produced off the critical path, as by DataLoader workers
            for s in range(total_steps):
                ctx, tgt = self._cpu_masks(s)
                self.prefetched[s] = (ctx.pin_memory(), tgt.pin_memory()) if self.cuda else (ctx, tgt)
        self.compile_blocks = impl.compile
        if impl.compile:
            backend = "inductor" if self.cuda else "eager"  # Inductor's CPU codegen would take minutes here
            for blocks in (self.model.encoder.blocks, self.model.target_encoder.blocks,
                           self.model.predictor.predictor_blocks):
                for b in blocks:
                    b.compile(backend=backend, dynamic=True)  # masks change Nc and Nt every step

    def _cpu_masks(self, step):
        return ijepa_masks_cpu(self.case.batch, self.grid, seed=self.seed, step=step)

    def _masks(self, step):
        kind = self.impl.masks
        if kind == "device":
            return self.sample_block_masks(self.case.batch, self.grid, seed=self.seed, step=step, device=self.device)
        ctx, tgt = self.prefetched[step] if kind == "ijepa_cpu_prefetched" else self._cpu_masks(step)
        return ctx.to(self.device, non_blocking=True), tgt.to(self.device, non_blocking=True)

    def inputs(self, step):
        from ..transforms import action_vector, apply, normalize, sample_params

        x = self.images.to(self.device, non_blocking=True).float().div_(255.0)
        params = sample_params(self.case.batch, seed=self.seed, step=step, device=self.device)
        source = normalize(apply(x, params, "source", check_range=False))
        target = normalize(apply(x, params, "target", check_range=False))
        ctx, tgt = self._masks(step)
        return source, target, ctx, tgt, action_vector(params)

    def step(self, step, timer):
        from ..models.loss import jepa_loss

        model = self.model
        timer.mark("start")
        source, target, ctx, tgt, action = self.inputs(step)
        timer.mark("data")
        dtype = torch.bfloat16 if self.cuda else torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.cuda):
            h = model.targets(target, tgt)
            timer.mark("target_encoder")
            z = model.encoder(source, ctx)
            timer.mark("context_fwd")
            if timer.enabled:
                z.register_hook(lambda g: timer.mark("predictor_bwd"))
            loss = jepa_loss(model.predictor(z, ctx, tgt, action), h, model.loss_kind)
        timer.mark("predictor_fwd")
        loss.backward()
        timer.mark("context_bwd")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        timer.mark("optimizer")
        self.ema(model.target_encoder, model.encoder, 0.996)
        timer.mark("ema")
        return loss.detach()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(case, impl, device, b):
    """Throughput and breakdown of one configuration. Returns a dict of measurements."""
    total = b.warmup + b.steps + b.breakdown
    t0 = time.perf_counter()
    stepper = Stepper(case, impl, device, total)
    setup_s = time.perf_counter() - t0
    off = PhaseTimer(device, enabled=False)
    with use_implementation(stepper.model, impl):
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for s in range(b.warmup):
            loss = stepper.step(s, off)
            _sync(device)
        warm_s = time.perf_counter() - t0
        times = []
        for s in range(b.warmup, b.warmup + b.steps):
            t0 = time.perf_counter()
            loss = stepper.step(s, off)
            float(loss)  # the loop's read-back: one sync per step
            times.append((time.perf_counter() - t0) * 1e3)
        timer = PhaseTimer(device, enabled=True)
        phases = {p: [] for p in PHASES}
        for s in range(b.warmup + b.steps, total):
            stepper.step(s, timer)
            for name, ms in timer.phases_ms().items():
                phases.setdefault(name, []).append(ms)
    stats = harness._quantiles(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")
    compile_s = max(0.0, warm_s - b.warmup * stats[0] * 1e-3) if impl.compile else 0.0
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


def _attention_available(device):
    """Triton attention in the e2e step on CUDA only: under the CPU interpreter one tiny step takes many seconds
    (the kernels' own tests cover them there; the CPU run checks the plumbing)."""
    return torch.device(device).type == "cuda"


def run(device, quick, cases=None, configs=None):
    NOTES.clear()
    ROWS_SO_FAR.clear()
    meta = harness.metadata(device)
    b = budget(device, quick)
    if cases is None:
        cases = CPU_CASES if torch.device(device).type != "cuda" else (CUDA_CASES if not quick else CUDA_CASES[:3])
    configs = list(configs or IMPLEMENTATIONS)
    dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    rows, t_start = ROWS_SO_FAR, time.perf_counter()
    for case in cases:
        shape = f"{case.model}/{case.mode}/B{case.batch}"
        throughput = {}
        for name in configs:
            impl = IMPLEMENTATIONS[name]
            if time.perf_counter() - t_start > b.seconds:
                NOTES.append(f"skipped: e2e {shape} {name}: past the {b.seconds:.0f} s budget")
                continue
            if impl.attention == "triton" and not _attention_available(device):
                impl = dataclasses.replace(impl, attention="sdpa")
                NOTES.append(f"note: e2e {shape} {name}: Triton attention runs on CUDA only here; ran SDPA")
            try:
                m = measure(case, impl, device, b)
            except Exception as exc:  # one configuration failing (OOM, compile error) must not stop the rest
                NOTES.append(f"skipped: e2e {shape} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                             if str(exc) else f"skipped: e2e {shape} {name}: {type(exc).__name__}")
                _cleanup(impl.compile)
                continue
            _cleanup(impl.compile)
            step = m["step_ms"]
            ips = harness.row("e2e", name, shape, dtype, "images_per_s", harness.rate(case.batch, step, 1.0), meta)
            rows.append(ips)
            throughput[name] = ips
            rows.append(harness.row("e2e", name, shape, dtype, "step_ms", step, meta))
            for phase, st in m["phases"].items():
                rows.append(harness.row("e2e", name, shape, dtype, f"phase_ms:{phase}", st, meta))
            rows.append(harness.row("e2e", name, shape, dtype, "compile_s", (m["compile_s"],) * 3, meta))
            rows.append(harness.row("e2e", name, shape, dtype, "peak_mem_gib", (m["peak_mem_gib"],) * 3, meta))
            print(f"e2e {shape:28s} {name:20s} {ips['median']:9.1f} images/s  step {step[0]:8.1f} ms"
                  + (f"  compile {m['compile_s']:.0f} s" if impl.compile else ""), flush=True)
        rows += speedup_rows(throughput, meta)
    return list(rows)


def speedup_rows(throughput, meta):
    """images/s of each configuration over (a)'s and over (b)'s, measured in the same run (p20/p80: the
    configuration's own spread over the baseline's median)."""
    out = []
    for base in ("a_ijepa_eager", "b_pytorch_compile"):
        if base not in throughput:
            continue
        ref = throughput[base]["median"]
        for name, r in throughput.items():
            if name <= base:  # only later configurations against earlier baselines: c/a, d/a, c/b, d/b, b/a
                continue
            stats = (r["median"] / ref, r["p20"] / ref, r["p80"] / ref)
            out.append(harness.row("e2e", name, r["shape"], r["dtype"], f"speedup_vs_{base}", stats, meta))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="End-to-end IWM training-step benchmark")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", default=None)
    p.add_argument("--configs", default=None, help="comma-separated subset of " + ",".join(IMPLEMENTATIONS))
    a = p.parse_args(argv)
    configs = a.configs.split(",") if a.configs else None
    rows = run(a.device, a.quick, configs=configs)
    for n in NOTES:
        print(n)
    if a.csv:
        harness.write_csv(rows, a.csv)
    return rows


if __name__ == "__main__":
    main()
