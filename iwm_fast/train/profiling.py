"""The profiler component: ``profile=true`` records a few steps with torch.profiler (rank 0)."""
import sys

import torch


class Profiler:
    """Steps 2-5 of the run (one to wait, one to warm up, three recorded); a no-op unless enabled."""

    def __init__(self, enabled, run):
        self.run = run  # a RunDir: where the trace and the kernel table go
        self.prof = None
        if not enabled:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                            record_shapes=True)
        self.prof.start()

    def step(self):
        if self.prof is not None:
            self.prof.step()

    def close(self):
        if self.prof is None:
            return
        self.prof.stop()
        trace = self.run.profile_trace_path
        self.prof.export_chrome_trace(trace)
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(self.run.profile_table_path, "w") as f:
            f.write(self.prof.key_averages().table(sort_by=key, row_limit=40))
        print(f"[iwm-fast] profiler trace: {trace} (open in Perfetto or chrome://tracing)", file=sys.stderr)
        self.prof = None
