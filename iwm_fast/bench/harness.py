"""Shared benchmark plumbing: timing (median and p20/p80 of many runs), run metadata, CSV rows."""
import csv
import datetime
import os
import statistics
import subprocess
import time

import torch

COLUMNS = ["kernel", "provider", "shape", "dtype", "metric", "median", "p20", "p80",
           "gpu", "torch", "triton", "commit", "date"]


def _quantiles(samples):
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return statistics.median(s), q(0.2), q(0.8)


def time_ms(fn, device, warmup=5, reps=50, cpu_reps=5):
    """(median, p20, p80) milliseconds of ``fn()``.

    On CUDA the times come from Triton's ``do_bench`` (CUDA events, L2 flushed between runs);
    on the CPU from a host clock over ``cpu_reps`` runs, for testing the harness only.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup * 5, rep=reps * 2, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    fn()
    samples = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def host_us_per_call(fn, device, calls=200, warm_calls=3):
    """Host time of one ``fn()`` in microseconds: a loop of ``calls`` calls (10 on the CPU, where the host does
    all the work) between two host clock reads, with no sync inside (the device runs behind; launches queue),
    after a sync. The cost a training step pays on the CPU, which a device timer cannot see."""
    for _ in range(warm_calls):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    else:
        calls = min(calls, 10)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) * 1e6 / calls
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return us, us, us


def time_warm_ms(fn, device, warm_calls=3):
    """``time_ms`` after a few untimed calls that pay one-time costs (table builds, dispatch, compilation)."""
    for _ in range(warm_calls):
        fn()
    return time_ms(fn, device)


def warn_if_interpreting(device):
    if torch.device(device).type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("warning: TRITON_INTERPRET=1 on CUDA runs the kernels in the interpreter; unset it to benchmark")


def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def metadata(device):
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "commit": git_commit(),
            "date": datetime.date.today().isoformat()}


def row(kernel, provider, shape, dtype, metric, stats, meta):
    """One CSV row; ``stats`` is (median, p20, p80) of ``metric`` (for rates, p20/p80 follow the times)."""
    med, p20, p80 = stats
    return {"kernel": kernel, "provider": provider, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
            "metric": metric, "median": float(med), "p20": float(p20), "p80": float(p80), **meta}


def rate(work, stats_ms, scale):
    """Convert (median, p20, p80) milliseconds into a rate: ``work`` units per second divided by ``scale``."""
    return tuple(work / (t * 1e-3) / scale for t in stats_ms)


def write_csv(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in COLUMNS})
    return path


class CsvSink:
    """Appends rows to a CSV (the header first when the file is new), flushed one by one, so that whatever stops
    the process later cannot take a finished row with it."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, row):
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: row[k] for k in COLUMNS})


def print_table(rows, columns=("kernel", "shape", "dtype", "provider", "metric", "median", "p20", "p80")):
    """Aligned text table of rows; numbers with three decimals."""
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) if v[:1].isdigit() or v[:1] == "-" else v.ljust(w) for v, w in zip(row, widths)))


def bench_main(run, description, argv=None):
    """The command line every benchmark module shares: --device, --quick, --csv; prints the rows."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    rows = list(run(args.device, args.quick))
    print_table(rows)
    if args.csv:
        print("wrote", write_csv(rows, args.csv))
    return rows
