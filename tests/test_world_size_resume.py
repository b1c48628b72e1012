"""A run resumes on another number of processes (torchrun, gloo, on the CPU): 2 processes then 1, and 1 then
2, against an uninterrupted run. The data position in a checkpoint is global (samples consumed by all
ranks); DCP reshards the model and optimizer. And ranks whose launcher was SIGKILLed do not run on."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from iwm_fast.train import checkpoint as ckpt
from process_tree import children, wait_gone

# A small run: 2 encoder blocks, 6 steps of a global batch of 8, a checkpoint every 3.
TINY = ["model.size=tiny", "model.depth=2", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2",
        "train.batch_size=8", "train.warmup_steps=2", "train.lr=5e-4", "train.log_every=1000",
        "train.device=cpu", "eval.enabled=false", "train.steps=6", "train.checkpoint_every=3",
        "train.keep_checkpoints=5"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PYTHONPATH: a script run by path imports the iwm_fast of this checkout, not an installed one.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
       "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def _run(nproc, max_steps, out_dir, extra=()):
    script = [os.path.join(os.path.dirname(__file__), "train_until.py"), str(max_steps), "configs/demo_cpu.yaml",
              *TINY, *extra, f"train.out_dir={out_dir}"]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", "--standalone"]
    out = subprocess.run(launcher + script, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _losses(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("ws") / "one"
    _run(1, 0, run)
    return run


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_processes(uninterrupted, tmp_path, before, after):
    run = tmp_path / "run"
    _run(before, 3, run)
    assert ckpt.latest_checkpoint(run / "checkpoints").endswith("step_00000003")
    err = _run(after, 0, run)
    assert "resumed from" in err and "at step 3" in err
    want, got = _losses(uninterrupted), _losses(run)
    assert len(got) == len(want) == 6
    if before == 1:
        assert got[:3] == want[:3]  # the same single process up to the checkpoint: bit for bit
    # Steps on 2 processes differ from 1 process only by the order of float sums (the gradient all-reduce):
    # a wrong data position or a lost optimizer state would move the loss far more.
    print(f"{before} -> {after} processes: largest relative loss difference "
          f"{max(abs(a - b) / abs(a) for a, b in zip(want, got)):.2e}")
    for a, b in zip(want, got):
        assert abs(a - b) <= 1e-5 * abs(a), (want, got)
    ref = torch.load(uninterrupted / "target_encoder.pt")
    new = torch.load(run / "target_encoder.pt")
    assert ref.keys() == new.keys()
    for k in ref:
        torch.testing.assert_close(new[k], ref[k], rtol=1e-4, atol=1e-5)


def test_ranks_stop_when_their_launcher_is_killed(tmp_path):
    """SIGKILL to torchrun itself: its ranks notice, stop as on SIGTERM (a checkpoint at the next log step)
    and exit, instead of training on, orphaned, into the run directory."""
    run = tmp_path / "run"
    args = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "iwm_fast.train.cli",
            "configs/demo_cpu.yaml", *TINY, "train.steps=3000", "train.log_every=1", "train.checkpoint_every=1000",
            "train.term_grace_s=30", f"train.out_dir={run}"]
    launcher = subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    ranks = set()
    try:
        deadline = time.monotonic() + 600
        while not os.path.exists(run / "metrics.csv") and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        launcher.kill()
        left = wait_gone(ranks, 90)
        _, err = launcher.communicate(timeout=60)  # the ranks held the pipes: they are closed once they are gone
        assert not left, f"ranks {left} still running without their launcher"
        # Each rank notices the launcher within a second; one that hears of the stop from its peer first (the
        # stop is agreed over all ranks at a log step) stops without saying so, which is the same outcome.
        assert err.count("the launcher (pid") in (1, 2) and "Traceback" not in err, err[-3000:]
        assert err.count("stopped by SIGTERM after step") == 2, err[-3000:]
        assert ckpt.latest_checkpoint(run / "checkpoints") is not None
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_shard_run_on_two_processes_resumes_exactly(tmp_path):
    """Shards are read per rank and loader worker, so every rank's position goes into the checkpoint (gathered
    at the save) and each rank resumes from its own: the resumed run repeats the uninterrupted one."""
    import json

    from iwm_fast.data.make_shards import main as make_shards
    from test_shards import _image_folder

    src = _image_folder(tmp_path / "folder")
    assert make_shards([str(src), str(tmp_path / "shards"), "--shard-size", "3", "--no-progress"]) == 0
    shards = ["data.dataset=shards", f"data.root={tmp_path / 'shards'}", "data.num_workers=2", "train.steps=4",
              "train.checkpoint_every=2"]
    _run(2, 0, tmp_path / "whole", shards)
    _run(2, 3, tmp_path / "part", shards)
    saved = ckpt.latest_checkpoint(tmp_path / "part" / "checkpoints")
    assert saved.endswith("step_00000002")
    with open(os.path.join(saved, "meta.json")) as f:
        assert len(json.load(f)["data"]["ranks"]) == 2
    _run(2, 0, tmp_path / "part", shards)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")
