"""Per-step metrics (CSV and TensorBoard, rank 0 only), a console progress bar, and the peak FLOP/s for the MFU."""
import csv
import io
import os

import torch

from .files import fsync_dir

# Per step: loss, schedules and ``nonfinite`` (1: the loss was not finite and the update was skipped). Per log
# window, on its last step's row: throughput, step time, data wait, peak memory and MFU over the window.
FIELDS = ["step", "loss", "lr", "wd", "momentum", "images_per_s", "step_time_s", "data_wait_frac",
          "peak_mem_mb", "mfu", "nonfinite"]
# Per log step: the collapse monitor's effective ranks and feature spread (train/collapse.py).
FIELDS += ["target_rankme", "pred_rankme", "target_std"]
_RENAMED = {"nonfinite": "skipped"}

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU estimate, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class MetricsWriteError(RuntimeError):
    """metrics.csv could not be written (a full disk); the rows already in the file are kept."""


def check_metrics_file(path):
    """Refuse a ``metrics.csv`` that is not one of ours (its header does not start with step, loss): another
    tool's file, which rewriting it on a resume would destroy."""
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MetricsWriteError(f"{path} is unreadable ({e}); move it away or give another run directory") from None
    if header is not None and header[:2] != FIELDS[:2]:
        shown = ",".join(header)[:80]
        raise MetricsWriteError(f"{path} is not a metrics file of this engine (its header is {shown!r}); move it "
                                "away or give another run directory: it is not overwritten")


class MetricsLogger:
    """Appends one row per step to ``RUN_DIR/metrics.csv`` (and TensorBoard), rank 0 only.

    No failure loses a row already written: a resume that must drop rows logged after its checkpoint rewrites
    the file through a temporary file, fsync and an atomic rename; every later row is appended, and a failed
    append (a full disk) is cut back to the last whole row before MetricsWriteError is raised.
    """

    def __init__(self, run_dir, enabled=True, resume_step=0):
        from ..run_dir import RunDir

        run = RunDir(run_dir)  # a RunDir or its path
        self.enabled = enabled
        self.path = run.metrics_path
        self._tb = None
        self._file = None
        if not enabled:
            return
        self._prepare(resume_step)
        try:
            self._file = open(self.path, "a", newline="")
        except OSError as e:
            raise MetricsWriteError(f"cannot open {self.path} for appending ({e.strerror or e})") from e
        self._size = os.path.getsize(self.path)
        from torch.utils.tensorboard import SummaryWriter  # imported here: it takes a second, and rank 0 only

        self._tb = SummaryWriter(run.tensorboard_dir)

    def _prepare(self, resume_step):
        """Leave a file holding the header and exactly the whole rows of steps 1..resume_step."""
        rows, header, whole = [], None, True
        check_metrics_file(self.path)
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                text = f.read()
            reader = csv.DictReader(io.StringIO(text))
            header = reader.fieldnames
            for r in reader:
                # Keep whole rows of steps already covered by the checkpoint; a row cut short by a crash has
                # empty trailing fields (None) and is dropped with the rows logged after the checkpoint.
                if None in r.values() or None in r or not (r.get("step") or "").isdigit():
                    whole = False
                    continue
                if int(r["step"]) <= resume_step:
                    rows.append(r)
                else:
                    whole = False
            whole = whole and text.endswith("\n")
        if header == FIELDS and whole and len(rows) == resume_step:
            return  # nothing to drop: append to the file as it is
        self._rewrite(rows)

    def _rewrite(self, rows):
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                # "nonfinite" was called "skipped" before; an older run's rows keep their flags.
                w.writerows({k: r.get(k, r.get(_RENAMED.get(k), "")) for k in FIELDS} for r in rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as e:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise MetricsWriteError(f"cannot rewrite {self.path} ({e.strerror or e}); its {len(rows)} rows are "
                                    "kept as they were") from e

    def log(self, row):
        if not self.enabled:
            return
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=FIELDS).writerow({k: row.get(k, "") for k in FIELDS})
        line = buf.getvalue()
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as e:
            self._cut_back()
            raise MetricsWriteError(f"cannot append step {row.get('step')}'s row to {self.path} "
                                    f"({e.strerror or e}); the rows before it are kept") from e
        self._size += len(line.encode())
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v == v:
                    self._tb.add_scalar(f"train/{k}", v, row["step"])

    def _cut_back(self):
        """Drop a partly written row, so the file ends on a whole row (truncating needs no free space)."""
        try:
            self._file.close()
        except OSError:
            pass  # the buffered rest of the row could not be flushed either: it is dropped below
        try:
            os.truncate(self.path, self._size)
        except OSError:
            pass
        self._file = open(self.path, "a", newline="")

    def close(self):
        if self.enabled and self._file is not None:
            try:
                self._file.close()
            except OSError:
                self._cut_back()
                self._file.close()
            if self._tb is not None:
                self._tb.close()


def progress_bar(total, start=0, enabled=True):
    """tqdm over the run's steps, advanced at log steps (with the window's loss and images/s)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train", mininterval=1.0)
