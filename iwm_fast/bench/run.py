"""``iwm-bench``: run every kernel benchmark and the end-to-end step benchmark; write CSV, summary and plots.

    iwm-bench --quick                      # a few minutes on one GPU
    iwm-bench --device cpu --quick         # tiny shapes, seconds: tests the harness
    iwm-bench --only e2e,attention --out DIR

Each benchmark is ``iwm_fast.bench.<name>.run(device, quick) -> rows``, imported lazily: one that is missing,
fails to import, raises or times out becomes a "skipped: <reason>" line in the summary and the rest still run.
On CUDA each benchmark runs in its own process (``--isolate``, the default there) so that a crashed kernel or
a poisoned CUDA context cannot take the others down, and ``--timeout`` bounds each one.

Files (``--out``, default benchmarks/results/), named by date and GPU, e.g. ``2026-11-29_H200_quick``:
``.csv`` (columns ``harness.COLUMNS``), ``_summary.md``, ``_speedup.png`` and ``_e2e.png``. CSV and summary
are rewritten after every benchmark, so a run cut short still leaves what it measured.
"""
import argparse
import datetime
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback

BENCHMARKS = ("attention", "gather", "ema", "masks", "data", "e2e")
DEFAULT_OUT = os.path.join("benchmarks", "results")


def gpu_tag(gpu_name):
    """'NVIDIA H100 80GB HBM3' -> 'H100-80GB-HBM3'; file-name safe."""
    name = re.sub(r"\b(NVIDIA|Tesla|GeForce)\b", "", gpu_name)
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "gpu"


def file_stem(meta, device, quick):
    date = meta.get("date") or datetime.date.today().isoformat()
    suffix = "_quick" if quick else ""
    if device.startswith("cuda"):
        return f"{date}_{gpu_tag(meta['gpu'])}{suffix}"
    return f"cpu-{date}{suffix}"  # CPU smoke runs are not results (benchmarks/results/cpu-* is git-ignored)


def _short(exc):
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300]}" if msg else type(exc).__name__


def _valid_rows(rows, columns):
    """Rows that are dicts holding every CSV column with a numeric median; (kept, number dropped)."""
    if not isinstance(rows, (list, tuple)):
        return [], -1
    kept = []
    for r in rows:
        try:
            if isinstance(r, dict) and all(c in r for c in columns):
                float(r["median"]), float(r["p20"]), float(r["p80"])
                kept.append(r)
        except (TypeError, ValueError):
            pass
    return kept, len(rows) - len(kept)


def run_in_process(name, device, quick):
    """Import and run one benchmark here. Returns {"rows", "notes", "status"}; never raises."""
    from . import harness

    modname = f"iwm_fast.bench.{name}"
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        reason = "module not found" if exc.name == modname else f"import failed: {_short(exc)}"
        return {"rows": [], "notes": [], "status": f"skipped: {modname} {reason}"}
    except Exception as exc:
        traceback.print_exc()
        return {"rows": [], "notes": [], "status": f"skipped: {modname} import failed: {_short(exc)}"}
    if not callable(getattr(module, "run", None)):
        return {"rows": [], "notes": [], "status": f"skipped: {modname} has no run(device, quick)"}
    t0 = time.perf_counter()
    try:
        rows = module.run(device, quick)
    except Exception as exc:
        traceback.print_exc()
        notes = [str(n) for n in getattr(module, "NOTES", [])]
        return {"rows": [], "notes": notes, "status": f"skipped: failed after {time.perf_counter() - t0:.0f} s: "
                                                      f"{_short(exc)}"}
    kept, dropped = _valid_rows(rows, harness.COLUMNS)
    notes = [str(n) for n in getattr(module, "NOTES", [])]
    if dropped < 0:
        return {"rows": [], "notes": notes, "status": f"skipped: run() returned {type(rows).__name__}, not rows"}
    if dropped:
        notes.append(f"dropped {dropped} malformed rows (missing columns or non-numeric values)")
    status = f"ok: {len(kept)} rows in {time.perf_counter() - t0:.0f} s"
    if not kept:
        status = "skipped: produced no rows"
    return {"rows": kept, "notes": notes, "status": status}


def _child_on_sigterm(name, result_path, t0):
    """On SIGTERM (the parent's time limit) a child writes the rows its module has finished so far, if any."""
    def handler(signum, frame):
        from . import harness

        module = sys.modules.get(f"iwm_fast.bench.{name}")
        rows, _ = _valid_rows(list(getattr(module, "ROWS_SO_FAR", [])), harness.COLUMNS)
        notes = [str(n) for n in getattr(module, "NOTES", [])]
        status = f"partial: stopped at the time limit after {time.perf_counter() - t0:.0f} s, {len(rows)} rows kept"
        with open(result_path, "w") as f:
            json.dump({"rows": rows, "notes": notes, "status": status if rows else "skipped: timed out"}, f)
        os._exit(0)
    signal.signal(signal.SIGTERM, handler)


def run_isolated(name, device, quick, timeout, grace=20.0):
    """Run one benchmark in a child process (its output streams to ours) with a time limit.

    At the limit the child gets SIGTERM and ``grace`` seconds to hand over its finished rows, then SIGKILL.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "iwm_fast.bench.run", "--child", name, "--child-result", result_path,
               "--device", device] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd)
        try:
            proc.wait(timeout=max(1.0, timeout - grace))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if not os.path.exists(result_path):
                return {"rows": [], "notes": [], "status": f"skipped: timed out after {timeout:.0f} s"}
        if not os.path.exists(result_path):
            return {"rows": [], "notes": [], "status": f"skipped: child process died (exit {proc.returncode}) "
                                                      f"after {time.perf_counter() - t0:.0f} s"}
        with open(result_path) as f:
            return json.load(f)


def _write_outputs(out_dir, stem, rows, statuses, meta, args_line, plots):
    from . import harness, report

    paths = {}
    if plots:
        for key, fn in (("speedup_png", report.plot_speedups), ("e2e_png", report.plot_breakdown)):
            try:
                p = fn(os.path.join(out_dir, f"{stem}_{key.replace('_png', '')}.png"), rows)
            except Exception as exc:  # no matplotlib, say: the CSV and summary still count
                statuses["plots"] = {"status": f"skipped: {_short(exc)}", "notes": []}
                p = None
            if p:
                paths[key] = p
    paths["csv"] = harness.write_csv(rows, os.path.join(out_dir, f"{stem}.csv"))
    paths["summary"] = report.write_summary(os.path.join(out_dir, f"{stem}_summary.md"), rows, statuses, meta,
                                            args_line)
    return paths


def parse_args(argv):
    import torch

    p = argparse.ArgumentParser(prog="iwm-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and steps (a few minutes on one GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default benchmarks/results/)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated benchmarks to run, from {','.join(BENCHMARKS)} (default: all)")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one process per benchmark (default on CUDA)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="run all in this process")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per benchmark when isolated (default: 240 quick, 1800 full)")
    p.add_argument("--deadline", type=float, default=None,
                   help="wall-clock seconds for the whole run: later benchmarks get what is left, or are skipped")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    names = BENCHMARKS if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    a.names = list(dict.fromkeys(names))
    if a.isolate is None:
        a.isolate = a.device == "cuda"
    if a.timeout is None:
        a.timeout = 240.0 if a.quick else 1800.0
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.child:  # one benchmark for an isolating parent: result as JSON, output on our stdout
        _child_on_sigterm(a.child, a.child_result, time.perf_counter())
        result = run_in_process(a.child, a.device, a.quick)
        with open(a.child_result, "w") as f:
            json.dump(result, f)
        return 0
    from . import harness, report

    meta = harness.metadata(a.device)
    stem = file_stem(meta, a.device, a.quick)
    args_line = "iwm-bench " + " ".join(shlex.quote(x) for x in argv)
    rows, statuses = [], {}
    t_start = time.perf_counter()
    for name in a.names:
        timeout = a.timeout
        if a.deadline is not None:
            left = a.deadline - (time.perf_counter() - t_start)
            if left < 20:
                statuses[name] = {"status": f"skipped: no time left (--deadline {a.deadline:.0f} s)", "notes": []}
                print(f"[iwm-bench] {name}: {statuses[name]['status']}", flush=True)
                continue
            timeout = min(timeout, left)
        print(f"[iwm-bench] {name} ({'isolated' if a.isolate else 'in process'}, {a.device}"
              f"{', quick' if a.quick else ''})", flush=True)
        t0 = time.perf_counter()
        res = run_isolated(name, a.device, a.quick, timeout) if a.isolate else run_in_process(name, a.device, a.quick)
        rows += res["rows"]
        statuses[name] = {"status": res["status"], "notes": res.get("notes", [])}
        print(f"[iwm-bench] {name}: {res['status']} ({time.perf_counter() - t0:.0f} s wall)", flush=True)
        for n in res.get("notes", []):
            print(f"[iwm-bench]   {n}", flush=True)
        _write_outputs(a.out, stem, rows, statuses, meta, args_line, plots=False)
    paths = _write_outputs(a.out, stem, rows, statuses, meta, args_line, plots=not a.no_plots)
    print()
    print(report.console_table(rows, statuses))
    for key, path in paths.items():
        print(f"[iwm-bench] {key}: {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
