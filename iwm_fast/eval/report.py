"""Evaluation outputs: eval.json, the printed summary table and the loss-curve PNG."""
import csv
import json
import math
import numbers
import os
import tempfile

import torch

REQUIRED_KEYS = ("probe_acc", "probe_acc_random", "mrr")

# Display order of the summary table; other keys follow alphabetically.
_ORDER = ("probe_acc", "probe_acc_random", "probe_acc_pixels", "rankme", "rankme_random",
          "mrr", "mrr_chance", "mrr_chance_stderr", "mrr_tokens", "mrr_identity", "mrr_bank_size", "mrr_num_queries",
          "probe_wd", "probe_wd_random")


def _plain(v):
    """JSON-safe Python value: tensors and numpy scalars become numbers, non-finite floats become None."""
    if torch.is_tensor(v):
        v = v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str)):
        v = v.item()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        v = float(v)
        return v if math.isfinite(v) else None
    raise TypeError(f"cannot write {type(v).__name__} value {v!r} as JSON")


def write_json(path, data) -> str:
    """Write ``data`` (numbers as plain JSON values) to ``path`` atomically: a crash never leaves a half-written
    file. Returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_plain(data), f, indent=2, sort_keys=True)
            f.write("\n")
        # mkstemp makes the file private (0600); a run's outputs are read by others like every file of the run
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_eval(path, results: dict) -> str:
    """Write the evaluation ``results`` to ``path`` (a run's ``eval.json``) atomically; returns the path."""
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise ValueError(f"evaluation results lack the required keys {missing}")
    return write_json(path, results)


def _fmt(v):
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        v = float(v)
        return f"{v:.4g}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4f}"
    return str(v)


def format_summary(results: dict) -> str:
    """A two-column aligned table of the evaluation results, main metrics first."""
    plain = _plain(results)
    keys = [k for k in _ORDER if k in plain] + sorted(k for k in plain if k not in _ORDER)
    rows = [("metric", "value")] + [(k, _fmt(plain[k])) for k in keys]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}" for a, b in rows]
    lines.insert(1, "-" * (w0 + 2 + w1))
    return "\n".join(lines)


def read_loss_csv(csv_path, step_key="step", loss_key="loss"):
    """``[(step, loss)]`` from a metrics CSV with a header naming ``step`` and ``loss`` columns."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or step_key not in reader.fieldnames or loss_key not in reader.fieldnames:
            raise ValueError(f"{csv_path} needs {step_key!r} and {loss_key!r} columns, has {reader.fieldnames}")
        points = []
        for row in reader:
            try:
                points.append((float(row[step_key]), float(row[loss_key])))
            except (TypeError, ValueError):
                continue  # a blank or non-numeric cell (e.g. a skipped step) is not a point on the curve
    return points


def plot_loss_curve(source, png_path, title="training loss") -> str:
    """Plot loss against step from a metrics CSV path or a list of ``(step, loss)``; writes a PNG, returns its path.

    Non-finite losses (skipped steps) are left out. A smoothed curve (EMA) is drawn over the raw one.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)  # headless; a no-op when a backend was already chosen
    import matplotlib.pyplot as plt

    points = read_loss_csv(source) if isinstance(source, (str, os.PathLike)) else list(source)
    points = [(float(s), float(l)) for s, l in points if math.isfinite(float(l))]
    if not points:
        raise ValueError("no finite loss values to plot")
    points.sort()
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.plot(steps, losses, lw=0.8, alpha=0.4 if len(points) > 20 else 1.0, label="loss")
        if len(points) > 20:
            # An averaging window of ~10 points, or ~1% of the run for long runs.
            beta = 0.9 if len(points) <= 1000 else 1.0 - 100.0 / len(points)
            m, smooth = 0.0, []
            for i, l in enumerate(losses):  # bias-corrected EMA
                m = beta * m + (1 - beta) * l
                smooth.append(m / (1 - beta ** (i + 1)))
            ax.plot(steps, smooth, lw=1.6, label="EMA")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        return save_png(fig, png_path)
    finally:
        plt.close(fig)


def save_png(fig, png_path):
    """Lay out ``fig`` and write it as a PNG (its folder made if needed); returns the path."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, format="png")
    return png_path
