"""``iwm-bench``: run every kernel benchmark and the end-to-end step benchmark; write CSV, summary and plots.

    iwm-bench --quick                      # a few minutes on one GPU
    iwm-bench --device cpu --quick         # tiny shapes, seconds: tests the harness
    iwm-bench --only e2e,attention --out DIR

Each benchmark is ``iwm_fast.bench.<name>.run(device, quick)``, yielding (or returning) rows, imported lazily: one
that is missing or fails to import is a "skipped" line in the summary, one that raises is "FAILED", and the rest
still run. On CUDA each benchmark runs in its own process (``--isolate``, the default there) so that a crashed
kernel or a poisoned CUDA context cannot take the others down.

Every row goes to the CSV the moment it is measured, by the process that measured it, so a run stopped from
outside (a time limit, Ctrl-C) keeps each finished row; the runner itself sets no time limits (the GPU check,
benchmarks/device_check.sh, owns the one time budget). Files (``--out``, default benchmarks/results/), named by
date and GPU, e.g. ``2026-11-29_H200_quick``: ``.csv`` (columns ``harness.COLUMNS``; started anew unless
``--append``), ``_summary.md``, ``_speedup.png`` and ``_e2e.png``.
"""
import argparse
import datetime
import importlib
import json
import os
import re
import shlex
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


def _valid(row, columns):
    """A dict holding every CSV column, with numeric median, p20 and p80."""
    if not isinstance(row, dict) or not all(c in row for c in columns):
        return False
    try:
        float(row["median"]), float(row["p20"]), float(row["p80"])
    except (TypeError, ValueError):
        return False
    return True


def run_in_process(name, device, quick, csv_path):
    """Import and run one benchmark here, appending each valid row to ``csv_path`` as it comes.
    Returns {"rows": count written, "notes", "status"} (status "ok: ...", "skipped: ..." or "FAILED: ...")."""
    from . import harness

    modname = f"iwm_fast.bench.{name}"
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        reason = "module not found" if exc.name == modname else f"import failed: {_short(exc)}"
        return {"rows": 0, "notes": [], "status": f"skipped: {modname} {reason}"}
    except Exception as exc:
        traceback.print_exc()
        return {"rows": 0, "notes": [], "status": f"FAILED: {modname} import failed: {_short(exc)}"}
    if not callable(getattr(module, "run", None)):
        return {"rows": 0, "notes": [], "status": f"skipped: {modname} has no run(device, quick)"}
    t0, written, dropped, status = time.perf_counter(), 0, 0, None
    sink = harness.CsvSink(csv_path)
    try:
        for row in module.run(device, quick):
            if _valid(row, harness.COLUMNS):
                sink.write(row)
                written += 1
            else:
                dropped += 1
    except Exception as exc:
        traceback.print_exc()
        status = f"FAILED after {time.perf_counter() - t0:.0f} s: {_short(exc)}"
    notes = [str(n) for n in getattr(module, "NOTES", [])]
    if dropped:
        notes.append(f"dropped {dropped} malformed rows (missing columns or non-numeric values)")
    if status is None:
        status = f"ok: {written} rows in {time.perf_counter() - t0:.0f} s" if written else "skipped: produced no rows"
    return {"rows": written, "notes": notes, "status": status}


def run_isolated(name, device, quick, csv_path):
    """Run one benchmark in a child process (its output streams to ours; its rows go to ``csv_path``)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "iwm_fast.bench.run", "--child", name, "--child-result", result_path,
               "--child-csv", csv_path, "--device", device] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)
        if not os.path.exists(result_path):
            return {"rows": 0, "notes": [], "status": f"FAILED: child process died (exit {proc.returncode}) after "
                                                      f"{time.perf_counter() - t0:.0f} s; its finished rows are kept"}
        with open(result_path) as f:
            return json.load(f)


def write_outputs(out_dir, stem, statuses, meta, args_line, plots):
    """Summary (and plots) from every row in the run's CSV."""
    from . import report

    csv_path = os.path.join(out_dir, f"{stem}.csv")
    rows = report.read_csv(csv_path) if os.path.exists(csv_path) else []
    paths = {"csv": csv_path}
    if plots:
        for key, fn in (("speedup_png", report.plot_speedups), ("e2e_png", report.plot_breakdown)):
            try:
                p = fn(os.path.join(out_dir, f"{stem}_{key.replace('_png', '')}.png"), rows)
            except Exception as exc:  # no matplotlib, say: the CSV and summary still count
                statuses["plots"] = {"status": f"skipped: {_short(exc)}", "notes": []}
                p = None
            if p:
                paths[key] = p
    paths["summary"] = report.write_summary(os.path.join(out_dir, f"{stem}_summary.md"), rows, statuses, meta,
                                            args_line)
    return paths, rows


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
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--append", action="store_true",
                   help="add to the day's CSV instead of starting it anew (the GPU check's stages share one)")
    for hidden in ("--child", "--child-result", "--child-csv"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
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
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.child:  # one benchmark for an isolating parent: rows to the CSV, status as JSON
        result = run_in_process(a.child, a.device, a.quick, a.child_csv)
        with open(a.child_result, "w") as f:
            json.dump(result, f)
        return 0
    from . import harness, report

    meta = harness.metadata(a.device)
    stem = file_stem(meta, a.device, a.quick)
    csv_path = os.path.join(a.out, f"{stem}.csv")
    if not a.append and os.path.exists(csv_path):
        os.remove(csv_path)
    args_line = "iwm-bench " + " ".join(shlex.quote(x) for x in argv)
    statuses = {}
    for name in a.names:
        print(f"[iwm-bench] {name} ({'isolated' if a.isolate else 'in process'}, {a.device}"
              f"{', quick' if a.quick else ''})", flush=True)
        t0 = time.perf_counter()
        res = run_isolated(name, a.device, a.quick, csv_path) if a.isolate else run_in_process(
            name, a.device, a.quick, csv_path)
        statuses[name] = {"status": res["status"], "notes": res.get("notes", [])}
        print(f"[iwm-bench] {name}: {res['status']} ({time.perf_counter() - t0:.0f} s wall)", flush=True)
        for n in res.get("notes", []):
            print(f"[iwm-bench]   {n}", flush=True)
        write_outputs(a.out, stem, statuses, meta, args_line, plots=False)
    paths, rows = write_outputs(a.out, stem, statuses, meta, args_line, plots=not a.no_plots)
    print()
    print(report.console_table(rows, statuses))
    for key, path in paths.items():
        print(f"[iwm-bench] {key}: {path}")
    failed = [n for n, st in statuses.items() if st["status"].startswith("FAILED")]
    for n in failed:
        print(f"[iwm-bench] FAILED: {n}", flush=True)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
