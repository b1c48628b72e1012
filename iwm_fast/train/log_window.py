"""The log window: what the loop records per step without reading anything back, and what it logs at log steps.

Between log steps every value stays on the device (losses, finiteness) or on the host (schedules, shapes,
host time). ``flush`` is the one host sync of the window: it reads the losses, writes one metrics row per step,
measures images/s, step time and MFU over the window, updates the progress bar and hands the finiteness flags to
the non-finite guard. The collapse monitor's statistics of a log step are read in the same transfer.
"""
import math
import time

import torch

from .collapse import FIELDS as COLLAPSE_FIELDS

class LogWindow:
    """``model.flops_per_image`` gives the MFU; ``target_mode`` is not read (the model knows its own)."""

    def __init__(self, *, logger, bar, guard, device, world_size, peak_flops, model, collapse=None):
        self.logger, self.bar, self.guard = logger, bar, guard
        self.collapse = collapse  # a CollapseMonitor: its statistics are read with the losses
        self.device, self.world, self.peak = device, world_size, peak_flops
        self.model = model
        self._steps = []
        self._t0 = time.perf_counter()
        self._data_s = 0.0

    def add(self, step, loss, finite, schedule, *, images, data_s, ctx_tokens, tgt_shape):
        """Record step ``step`` (1-based); ``loss``/``finite`` are device tensors, the rest host values."""
        self._steps.append((step, loss, finite, schedule, images, ctx_tokens, tgt_shape))
        self._data_s += data_s

    def __len__(self):
        return len(self._steps)

    def flush(self):
        """Read the window back (one sync), log it, and let the guard judge it. Returns the last step logged."""
        if not self._steps:
            return None
        losses, collapse = self._read_losses()
        finite = torch.stack([s[2] for s in self._steps]).cpu().tolist()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        n = len(self._steps)
        images = sum(s[4] for s in self._steps) * self.world
        window = {"images_per_s": images / elapsed, "step_time_s": elapsed / n,
                  "data_wait_frac": min(1.0, self._data_s / elapsed), "peak_mem_mb": _peak_mem_mb(self.device),
                  "mfu": self._mfu(elapsed)}
        for k, (step, _, _, sched, _, _, _) in enumerate(self._steps):
            row = {"step": step, "loss": losses[k], "lr": sched["lr"], "wd": sched["wd"],
                   "momentum": sched["momentum"], "nonfinite": int(not finite[k])}
            if k == n - 1:
                row.update(window)
            row.update(collapse.get(step, {}))
            self.logger.log(row)
        last = self._steps[-1][0]
        self.bar.update(last - self.bar.n)
        self.bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{window['images_per_s']:.1f}", refresh=False)
        steps = [s[0] for s in self._steps]
        empty = [s[4] == 0 for s in self._steps]
        self._steps, self._t0, self._data_s = [], now, 0.0
        for step, stats in collapse.items():
            self.collapse.observe(step, list(stats.values()))
        self.guard.observe(steps, [bool(f) for f in finite], empty)
        return last

    def _read_losses(self):
        """The window's losses, and the collapse statistics of its watched steps ({step: {field: value}}), read
        in one transfer."""
        losses = torch.stack([s[1].float() for s in self._steps])
        watched = self.collapse.pending() if self.collapse is not None else None
        if watched is None:
            return losses.cpu().tolist(), {}
        steps, stats = watched
        n = len(self._steps)
        values = torch.cat([losses.double(), stats.to(losses.device).flatten()]).cpu().tolist()
        k = len(COLLAPSE_FIELDS)
        return values[:n], {s: dict(zip(COLLAPSE_FIELDS, values[n + i * k:n + (i + 1) * k]))
                            for i, s in enumerate(steps)}

    def _mfu(self, elapsed):
        if self.peak is None:
            return ""
        flops = 0.0
        for _, _, _, _, images, ctx_tokens, tgt_shape in self._steps:
            flops += self.model.flops_per_image(ctx_tokens, tgt_shape) * images * self.world
        return flops / elapsed / (self.peak * self.world)


def _peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        return math.nan
