"""How a run ends when it does not simply finish: skipped last steps, a kill before the export, SIGTERM."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from iwm_fast.train import checkpoint as ckpt
from iwm_fast.config import load_config
from iwm_fast.train.guard import NonFiniteLossError
from iwm_fast.train.loop import train
from test_engine import TINY, losses


def cfg(out_dir, *extra):
    return load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={out_dir}", *extra])


def test_a_run_ending_on_skipped_steps_is_not_exported(tmp_path):
    last_two = lambda step, loss: loss * float("nan") if step >= 4 else loss  # noqa: E731  (steps 5 and 6)
    with pytest.raises(NonFiniteLossError, match="ended on 2 non-finite step"):
        train(cfg(tmp_path / "run", "train.steps=6", "train.checkpoint_every=3"), loss_hook=last_two)
    assert not os.path.exists(tmp_path / "run" / "target_encoder.pt")
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").endswith("step_00000003")


def test_no_decodable_image_says_so(tmp_path):
    root = tmp_path / "imgs" / "class0"
    root.mkdir(parents=True)
    for i in range(16):
        (root / f"{i}.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning), pytest.raises(NonFiniteLossError, match="no image could be decoded"):
        train(cfg(tmp_path / "run", "data.dataset=imagefolder", f"data.root={tmp_path / 'imgs'}",
                  "train.steps=6", "train.checkpoint_every=6", "train.max_bad_steps=3"))
    assert not os.path.exists(tmp_path / "run" / "target_encoder.pt")


def test_a_rerun_completes_a_missing_export(tmp_path):
    run = train(cfg(tmp_path / "run", "train.steps=2", "train.checkpoint_every=2"))
    exported = torch.load(os.path.join(run, "target_encoder.pt"))
    os.remove(os.path.join(run, "target_encoder.pt"))  # as if killed between the last checkpoint and the export
    train(cfg(tmp_path / "run", "train.steps=2", "train.checkpoint_every=2"))
    again = torch.load(os.path.join(run, "target_encoder.pt"))
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)


def test_sigterm_saves_at_the_next_step_and_the_rerun_matches(tmp_path):
    args = ["configs/demo_cpu.yaml", *TINY, "train.steps=40", "train.checkpoint_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    cli = [sys.executable, "-m", "iwm_fast.train.cli"]
    ref = tmp_path / "ref"
    subprocess.run(cli + args + [f"train.out_dir={ref}"], env=env, check=True, capture_output=True, timeout=900)
    run = tmp_path / "run"
    proc = subprocess.Popen(cli + args + [f"train.out_dir={run}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not os.path.exists(run / "metrics.csv") and time.monotonic() < deadline:  # the loop is starting
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err
    saved = ckpt.latest_checkpoint(run / "checkpoints")
    assert saved is not None, err[-2000:]
    step = int(os.path.basename(saved).split("_")[1])
    assert 0 < step < 40
    with open(run / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, step + 1))  # every row up to the save
    subprocess.run(cli + args + [f"train.out_dir={run}"], env=env, check=True, capture_output=True, timeout=900)
    assert losses(run) == losses(ref)  # resumed bit-identically


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    import iwm_fast.train.loop as loop_mod

    real = loop_mod.train_step

    def poisons_after_step_4(model, *a, step=0, **k):
        out = real(model, *a, step=step, **k)
        if step == 3:  # after the 4th step's update, before its checkpoint
            p = next(model.encoder.parameters())
            (p.to_local() if hasattr(p, "to_local") else p).detach().fill_(float("nan"))
        return out

    monkeypatch.setattr(loop_mod, "train_step", poisons_after_step_4)
    with pytest.raises(NonFiniteLossError, match="weights are not finite"):
        train(cfg(tmp_path / "run", "train.steps=4", "train.checkpoint_every=2"))
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").endswith("step_00000002")


def test_resuming_with_another_worker_count_is_allowed_and_identical(tmp_path):
    full = train(cfg(tmp_path / "full", "train.steps=4", "train.checkpoint_every=2"))
    part = tmp_path / "part"
    train(cfg(part, "train.steps=4", "train.checkpoint_every=2"), max_steps=2)
    train(cfg(part, "train.steps=4", "train.checkpoint_every=2", "data.num_workers=1"))
    assert losses(part) == losses(full)


def test_training_leaves_the_callers_index_check_as_it_was(tmp_path):
    from iwm_fast.ops.gather import get_index_check, set_index_check

    set_index_check("host")
    train(cfg(tmp_path / "run", "train.steps=1", "train.checkpoint_every=1"))
    assert get_index_check() == "host"  # the engine turns it off only while it trains


# ----- whole-job signals: every process of the job, loader workers included, in any order -----

CLI = [sys.executable, "-m", "iwm_fast.train.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
EVAL_TINY = ["eval.bank_size=4", "eval.num_queries=2", "eval.probe_epochs=1", "eval.max_train_images=40"]


def _rows(run):
    try:
        with open(run / "metrics.csv") as f:
            return [int(r["step"]) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []


@pytest.mark.parametrize("how", ["SIGTERM to the process group", "SIGTERM to the workers, then the main process",
                                 "SIGINT to the process group"])
def test_a_whole_job_signal_saves_and_exits_cleanly(tmp_path, how):
    """What SLURM's time limit, scancel, kill -- -PGID and Ctrl-C do: the loader workers get the signal too.
    They ignore it; the main process saves a stop checkpoint and exits 143 (SIGTERM) or 130 (SIGINT)."""
    from process_tree import children

    run = tmp_path / "run"
    args = ["configs/demo_cpu.yaml", *TINY, "train.steps=400", "train.checkpoint_every=1000", "train.log_every=1",
            "data.num_workers=2", f"train.out_dir={run}"]
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job step
    deadline = time.monotonic() + 600
    while len(_rows(run)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    sig = signal.SIGINT if how.startswith("SIGINT") else signal.SIGTERM
    if "workers" in how:
        workers = children(proc.pid)
        assert len(workers) >= 2
        for pid in workers:
            os.kill(pid, sig)
        time.sleep(1.0)  # steps go on with the signalled workers
        proc.send_signal(sig)
    else:
        os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert f"stopped by {sig.name} after step" in err
    saved = ckpt.latest_checkpoint(run / "checkpoints")
    assert saved is not None
    step = int(os.path.basename(saved).split("_")[1])
    assert 3 <= step < 400 and _rows(run) == list(range(1, step + 1))
    if how == "SIGTERM to the process group":  # the stop checkpoint resumes
        train(cfg(run, "train.steps=400", "train.checkpoint_every=1000", "train.log_every=1",
                  "data.num_workers=2"), max_steps=step + 2)
        assert _rows(run) == list(range(1, step + 3))


_SIGNAL_SELF = """
import os, signal, sys, time
import importlib
where, name, sig = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3])
module = importlib.import_module(where)
real = getattr(module, name)
def hooked(*a, **k):
    if name != "train_step" or k.get("step") == 1:  # the second (and last) step
        os.kill(os.getpid(), sig)
        time.sleep(0.5)
    return real(*a, **k)
setattr(module, name, hooked)
from iwm_fast.train.cli import train_main
sys.exit(train_main(sys.argv[4:]))
"""


def _signal_self(where, name, sig, args):
    return subprocess.run([sys.executable, "-c", _SIGNAL_SELF, where, name, sig, *args], env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_a_signal_in_the_last_step_leaves_the_export_to_a_rerun(tmp_path):
    run = tmp_path / "run"
    args = ["configs/demo_cpu.yaml", *TINY, "train.steps=2", "train.checkpoint_every=2", f"train.out_dir={run}"]
    r = _signal_self("iwm_fast.train.loop", "train_step", "SIGTERM", args)
    assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "stopped by SIGTERM after the last step (2)" in r.stderr and "export and evaluate it" in r.stderr
    assert ckpt.latest_checkpoint(run / "checkpoints").endswith("step_00000002")
    assert not os.path.exists(run / "target_encoder.pt")
    subprocess.run(CLI + args, env=ENV, check=True, capture_output=True, timeout=600)
    assert os.path.exists(run / "target_encoder.pt")


def test_a_signal_during_the_end_of_run_evaluation_says_what_a_rerun_does(tmp_path):
    run = tmp_path / "run"
    args = ["configs/demo_cpu.yaml", *TINY, "train.steps=2", "train.checkpoint_every=2", "eval.enabled=true",
            *EVAL_TINY, f"train.out_dir={run}"]
    r = _signal_self("iwm_fast.train.evaluate", "evaluate_run", "SIGTERM", args)
    assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "SIGTERM during the end-of-run export and evaluation; training is complete" in r.stderr
    assert "run the same command again to write what is missing" in r.stderr
    assert os.path.exists(run / "target_encoder.pt") and not os.path.exists(run / "eval.json")
    subprocess.run(CLI + args, env=ENV, check=True, capture_output=True, timeout=600)
    assert os.path.exists(run / "eval.json")  # what the message promised


def test_a_signal_before_the_first_step_is_one_line(tmp_path):
    run = tmp_path / "run"
    args = ["configs/demo_cpu.yaml", *TINY, "train.steps=2", f"train.out_dir={run}"]
    r = _signal_self("iwm_fast.train.loop", "build_training", "SIGINT", args)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "interrupted by SIGINT outside the training steps" in r.stderr
