"""metrics.csv never loses a row: resumes rewrite it atomically, a failed append is cut back to whole rows."""
import csv
import errno
import os

import pytest

from iwm_fast.train import metrics
from iwm_fast.train.metrics import FIELDS, MetricsLogger, MetricsWriteError


def _rows(run):
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def _log(run, steps, resume_step=0):
    m = MetricsLogger(str(run), resume_step=resume_step)
    for s in steps:
        m.log({"step": s, "loss": s / 10})
    m.close()


class _DiskFullAfter:
    """A file object whose writes fail with ENOSPC once ``budget`` more bytes have gone through."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, text):
        take = text[:max(0, self.budget)]
        self.f.write(take)
        self.f.flush()
        self.budget -= len(take)
        if len(take) < len(text):
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


class _NoEvents:
    """Stands in for TensorBoard's SummaryWriter: not under test, and its event files would join the run folder."""

    def __init__(self, log_dir):
        pass

    def add_scalar(self, *args):
        pass

    def close(self):
        pass


@pytest.fixture(autouse=True)
def no_tensorboard(monkeypatch):
    import torch.utils.tensorboard as tb
    monkeypatch.setattr(tb, "SummaryWriter", _NoEvents)


def test_resume_drops_only_the_rows_after_the_checkpoint(tmp_path):
    _log(tmp_path, [1, 2, 3, 4])
    _log(tmp_path, [3], resume_step=2)
    assert _rows(tmp_path) == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_a_full_disk_during_the_resume_rewrite_keeps_every_row(tmp_path, monkeypatch):
    _log(tmp_path, [1, 2, 3])
    real_open = open

    def full_disk_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return _DiskFullAfter(f, 10) if "w" in mode else f

    monkeypatch.setattr(metrics, "open", full_disk_open, raising=False)
    with pytest.raises(MetricsWriteError, match="cannot rewrite .*metrics.csv .*No space left on device"):
        MetricsLogger(str(tmp_path), resume_step=1)
    assert _rows(tmp_path) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert os.listdir(tmp_path) == ["metrics.csv"]  # no temporary file left behind


def test_a_full_disk_during_an_append_keeps_whole_rows(tmp_path):
    _log(tmp_path, [1, 2])
    m = MetricsLogger(str(tmp_path), resume_step=2)
    m._file = _DiskFullAfter(m._file, 7)  # part of step 3's row reaches the disk, then it is full
    with pytest.raises(MetricsWriteError, match="cannot append step 3's row to .*metrics.csv .*No space left"):
        m.log({"step": 3, "loss": 0.3})
    m.close()
    assert _rows(tmp_path) == [(1, 0.1), (2, 0.2)]
    with open(tmp_path / "metrics.csv") as f:
        assert f.read().endswith("\n")
    _log(tmp_path, [3], resume_step=2)  # space freed: the resumed run carries on
    assert _rows(tmp_path) == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_a_row_cut_short_by_a_crash_is_not_kept(tmp_path):
    _log(tmp_path, [1, 2, 3])
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("1")  # the first byte of step 12's row, say
    _log(tmp_path, [4], resume_step=3)
    assert _rows(tmp_path) == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    with open(tmp_path / "metrics.csv") as f:
        assert f.readline().strip() == ",".join(FIELDS)
