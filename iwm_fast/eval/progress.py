"""Progress bars (tqdm) for the long parts of an evaluation or a fine-tuning: count, rate and ETA on stderr.

On a terminal the bar is redrawn in place; into a log file (``iwm-train ... 2> log``, a SLURM job) each redraw
becomes its own line, at most every ``LOG_INTERVAL_S`` seconds, so a log never goes silent for long and never
fills with carriage returns. ``TQDM_DISABLE=1`` turns every bar off.
"""
import os
import sys

LOG_INTERVAL_S = 10.0


class _LineStream:
    """A file for tqdm that turns its in-place redraws into whole lines (for logs, not terminals)."""

    def __init__(self, stream):
        self.stream = stream
        self._at_line_start = True

    def write(self, s):
        s = s.replace("\r", "").rstrip(" ")
        if not s or (s == "\n" and self._at_line_start):
            return
        if not s.endswith("\n"):
            s += "\n"
        self.stream.write(s)
        self._at_line_start = True

    def flush(self):
        self.stream.flush()


def _disabled_by_env():
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def progress_bar(total, desc, unit="it", *, enabled=True, stream=None):
    """A ``tqdm`` bar of ``total`` units on ``stream`` (stderr); a disabled one costs nothing and prints nothing."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or _disabled_by_env(), leave=True,
                dynamic_ncols=tty, file=stream if tty else _LineStream(stream),
                mininterval=0.5 if tty else LOG_INTERVAL_S,
                ascii=not tty, unit_scale=unit == "img")
