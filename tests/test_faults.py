"""A seeded sweep of faults on a tiny CPU run: SIGKILL at random moments and between the last checkpoint and
the export, a damaged file in the latest checkpoint, a full disk (a write hook raising ENOSPC), a second trainer
on the same run directory, a finished run extended to more steps.

Each fault must end in a clear one-line error or in a completion bit-identical to an undisturbed run (same
metrics.csv losses, same target_encoder.pt), and never lose a completed checkpoint or a metrics row.

Runs are children of a forkserver that imported the engine once, so a trial pays for training, not for
importing torch; every child runs the same single-threaded CPU code, so undisturbed and resumed runs compare
bit for bit.
"""
import csv
import errno
import multiprocessing as mp
import os
import random
import shutil
import signal
import time

import pytest
import torch

from iwm_fast.train import checkpoint as ckpt

TINY = ["model.size=tiny", "model.depth=1", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2",
        "train.batch_size=8", "train.warmup_steps=5", "train.lr=5e-4", "train.log_every=1000",
        "train.device=cpu", "eval.enabled=false", "train.steps=4", "train.checkpoint_every=2",
        "train.keep_checkpoints=10"]
SEED = 1234


# ---------------------------------------------------------------- children (run in forkserver processes)

def _child(run_dir, log_path, hook, extra=()):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    if hook:
        globals()[hook]()
    from iwm_fast.train.cli import train_main
    raise SystemExit(train_main(["configs/demo_cpu.yaml", *TINY, f"train.out_dir={run_dir}", *extra]))


def _hook_kill_before_export():
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.export_target_encoder = die


def _hook_slow_steps():
    from iwm_fast.train import loop

    real_step = loop.train_step

    def slow(*a, **k):
        time.sleep(1.0)  # a run long enough for a second trainer to try the same directory
        return real_step(*a, **k)
    loop.train_step = slow


def _hook_disk_full_at_second_save():
    import torch.distributed.checkpoint.filesystem as fs

    real_save = ckpt.dcp.save

    def save(state, checkpoint_id):
        if "step_00000004" in str(checkpoint_id):
            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")
            fs._write_item = full
        return real_save(state, checkpoint_id=checkpoint_id)
    ckpt.dcp.save = save


def _hook_metrics_disk_full_at_step_3():
    from iwm_fast.train import metrics

    real_log = metrics.MetricsLogger.log

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def log(self, row):
        if row["step"] == 3 and not isinstance(self._file, HalfWritten):
            self._file = HalfWritten(self._file)
        return real_log(self, row)
    metrics.MetricsLogger.log = log


# ---------------------------------------------------------------- parent side

@pytest.fixture(scope="module")
def server():
    ctx = mp.get_context("forkserver")
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TRITON_INTERPRET")}
    os.environ.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    # Everything a run imports lazily (scikit-learn for the digits, dynamo under FSDP2, TensorBoard): ~15 s a child.
    ctx.set_forkserver_preload(["iwm_fast.train.loop", "iwm_fast.train.cli", "iwm_fast.train.data", "sklearn.datasets",
                                "torch._dynamo", "torch.utils.tensorboard", "torch.distributed.checkpoint"])
    warm = ctx.Process(target=time.sleep, args=(0,))  # start the server (and its imports) before any trial
    warm.start()
    warm.join()
    yield ctx
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _run(ctx, run_dir, *, hook="", kill_when=None, then_wait=0.0, timeout=300, extra=(), log=None):
    """Run the CLI in a child. With ``kill_when``, poll it every 2 ms and SIGKILL the child ``then_wait``
    seconds after it first holds. Returns (exit code, stderr text)."""
    log = log or f"{run_dir}.log"
    p = ctx.Process(target=_child, args=(str(run_dir), log, hook, tuple(extra)))
    p.start()
    deadline = time.monotonic() + timeout
    if kill_when is not None:
        while p.is_alive() and not kill_when(run_dir) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(then_wait)
        p.kill()
    p.join(max(0.0, deadline - time.monotonic()))
    if p.is_alive():
        p.kill()
        pytest.fail(f"the run in {run_dir} hung")
    with open(log) as f:
        err = f.read()
    os.remove(log)
    return p.exitcode, err


def _rows(run):
    path = os.path.join(run, "metrics.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def _encoder(run):
    return torch.load(os.path.join(run, "target_encoder.pt"))


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "reference"
    code, err = _run(server, run)
    assert code == 0, err[-2000:]
    return {"dir": run, "rows": _rows(run), "encoder": _encoder(run)}


def _assert_intact(run, reference):
    """No completed checkpoint damaged, every metrics row whole and equal to the reference's, none lost."""
    done = ckpt.complete_checkpoints(os.path.join(run, "checkpoints"))
    for path in done:
        ckpt.verify_checkpoint(path)  # raises on any damage a kill could have left
    rows = _rows(run)
    assert rows == reference["rows"][:len(rows)]
    last = int(os.path.basename(done[-1])[len(ckpt.PREFIX):]) if done else 0
    assert len(rows) >= last, "a row covered by a checkpoint was lost"


def _assert_completes_identically(ctx, run, reference):
    code, err = _run(ctx, run)
    assert code == 0, err[-2000:]
    assert _rows(run) == reference["rows"]
    want, got = reference["encoder"], _encoder(run)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def _rows_at_least(k):
    return lambda run: len(_rows(run)) >= k


def _saving(step):
    return lambda run: os.path.isdir(os.path.join(run, "checkpoints", f"{ckpt.TMP_PREFIX}{ckpt.PREFIX}{step:08d}"))


# Moments to kill at: while a step runs, while a checkpoint is written, right after the last step's row.
MOMENTS = [("step 2 running", _rows_at_least(1)), ("saving step 2", _saving(2)), ("step 4 running", _rows_at_least(3)),
           ("saving step 4", _saving(4)), ("after step 4's row", _rows_at_least(4))]


TRIALS = random.Random(SEED).sample(range(len(MOMENTS)), 3)


@pytest.mark.parametrize("trial", range(len(TRIALS)))
def test_sigkill_at_a_random_moment(server, reference, tmp_path, trial):
    rng = random.Random(SEED + trial)
    what, moment = MOMENTS[TRIALS[trial]]
    run = tmp_path / "run"
    code, _ = _run(server, run, kill_when=moment, then_wait=rng.uniform(0.0, 0.05))
    assert code == -signal.SIGKILL, f"the run ended (exit {code}) before the kill at {what}"
    _assert_intact(run, reference)
    _assert_completes_identically(server, run, reference)


def _killed_before_export(server, reference, tmp_path):
    run = tmp_path / "run"
    code, _ = _run(server, run, hook="_hook_kill_before_export")
    assert code == -signal.SIGKILL
    _assert_intact(run, reference)
    assert _rows(run) == reference["rows"]
    assert not os.path.exists(run / "target_encoder.pt")
    return run


def test_sigkill_between_the_last_checkpoint_and_the_export_then_rerun(server, reference, tmp_path):
    run = _killed_before_export(server, reference, tmp_path)
    code, err = _run(server, run)
    assert code == 0, err[-2000:]
    _assert_completes_identically(server, run, reference)


def test_sigkill_between_the_last_checkpoint_and_the_export_then_iwm_eval(server, reference, tmp_path):
    from iwm_fast.train.cli import eval_main

    run = _killed_before_export(server, reference, tmp_path)
    assert eval_main([str(run), "eval.num_queries=4", "eval.bank_size=8", "eval.probe_epochs=2",
                      "eval.max_train_images=32", "train.device=cpu"]) == 0
    want, got = reference["encoder"], _encoder(run)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def _flip(path, rng):
    offset = rng.randrange(os.path.getsize(path))
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))


def _truncate(path, rng):
    with open(path, "r+b") as f:
        f.truncate(rng.randrange(os.path.getsize(path)))


@pytest.mark.parametrize("trial", range(2))
def test_a_damaged_file_in_the_latest_checkpoint(server, reference, tmp_path, trial):
    rng = random.Random(SEED + 100 + trial)
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    os.remove(run / "target_encoder.pt")
    latest = run / "checkpoints" / "step_00000004"
    name = rng.choice(sorted(os.listdir(latest)))
    rng.choice([_flip, _truncate])(latest / name, rng)
    code, err = _run(server, run)
    assert code == 0, err[-2000:]
    assert f"skipped {latest}" in err and name in err and "falling back to" in err
    assert _rows(run) == reference["rows"]
    want, got = reference["encoder"], _encoder(run)
    assert all(torch.equal(got[k], want[k]) for k in want)
    ckpt.verify_checkpoint(str(latest))  # saved again, whole


@pytest.mark.parametrize("hook, message", [
    ("_hook_disk_full_at_second_save", r"disk full: saving checkpoint step_00000004 in .*checkpoints needs about "),
    ("_hook_metrics_disk_full_at_step_3", r"cannot append step 3's row to .*metrics.csv \(No space left on device\)"),
])
def test_a_full_disk(server, reference, tmp_path, hook, message):
    import re

    run = tmp_path / "run"
    code, err = _run(server, run, hook=hook)
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("iwm-train: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), err[-2000:]
    assert "Traceback" not in err
    _assert_intact(run, reference)
    assert ckpt.latest_checkpoint(str(run / "checkpoints")).endswith("step_00000002")
    _assert_completes_identically(server, run, reference)


def test_a_second_trainer_on_the_same_directory_is_refused(server, reference, tmp_path):
    # The first trainer holds the run directory; the second is refused in one line and changes nothing, and
    # the first ends exactly as an undisturbed run.
    import threading

    run = tmp_path / "run"
    first = {}
    thread = threading.Thread(target=lambda: first.update(zip(("code", "err"),
                                                              _run(server, run, hook="_hook_slow_steps"))))
    thread.start()
    deadline = time.monotonic() + 300
    while not _rows(run) and time.monotonic() < deadline:  # the first one holds the lock and trains
        time.sleep(0.01)
    code, err = _run(server, run, log=str(tmp_path / "second.log"))
    thread.join()
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("iwm-train: error:")]
    assert len(errors) == 1 and "is in use by another writer (iwm-train pid" in errors[0], err[-2000:]
    assert first["code"] == 0, first["err"][-2000:]
    assert _rows(run) == reference["rows"]
    want, got = reference["encoder"], _encoder(run)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_an_extended_run_refreshes_its_export(server, reference, tmp_path):
    import json

    from iwm_fast.models import build_iwm
    from iwm_fast.run_dir import RunDir

    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    code, err = _run(server, run, extra=["train.steps=8"])
    assert code == 0, err[-2000:]
    rows = _rows(run)
    assert [s for s, _ in rows] == list(range(1, 9)) and rows[:4] == reference["rows"]
    model = build_iwm(RunDir(run).read_config())
    ckpt.load_checkpoint(str(run / "checkpoints" / "step_00000008"), model)
    want, got = model.target_encoder.state_dict(), _encoder(run)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    with open(run / "outputs.json") as f:
        assert json.load(f)["target_encoder.pt"]["step"] == 8
