"""The training step reads nothing back to the host between log steps (torchtitan's and nanoGPT's rule).

On the CPU a host read is the same call as on a GPU (``item``, ``tolist``, ``bool``, ``float``, ``int``), so
wrapping those methods and counting the calls made inside the step (inputs, forward, backward, AdamW, EMA)
shows what a GPU run would sync on.
"""
import csv
import os

import pytest
import torch
from test_engine import TINY

from iwm_fast.train import step as step_mod
from iwm_fast.config import load_config
from iwm_fast.train.loop import train

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts host reads made while the step's own functions run."""
    state = {"inside": 0, "reads": []}

    def counting(name, real):
        def wrapper(self, *a, **k):
            if state["inside"]:
                state["reads"].append(name)
            return real(self, *a, **k)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    def inside(fn):
        def wrapper(*a, **k):
            state["inside"] += 1
            try:
                return fn(*a, **k)
            finally:
                state["inside"] -= 1
        return wrapper

    import iwm_fast.train.loop as loop_mod
    for mod in (step_mod, loop_mod):
        monkeypatch.setattr(mod, "train_step", inside(step_mod.train_step))
        monkeypatch.setattr(mod, "make_inputs", inside(step_mod.make_inputs))
    return state


def _cfg(tmp_path, *extra):
    return load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={tmp_path}", "train.steps=6",
                                                         "train.log_every=3", "train.checkpoint_every=100",
                                                         *extra])


def test_steps_make_no_host_read(tmp_path, host_reads):
    run = train(_cfg(tmp_path / "run"))
    assert host_reads["reads"] == []
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # every step logged, read back at log steps
    # throughput and MFU are measured per log window: on the window's last row
    assert [bool(r["images_per_s"]) for r in rows] == [False, False, True, False, False, True]


def test_the_count_sees_a_read(tmp_path, host_reads):
    # The same run with a loss hook that reads the loss: the wrapper must count it, or the test above proves nothing.
    train(_cfg(tmp_path / "run"), loss_hook=lambda step, loss: loss if float(loss) else loss)
    assert host_reads["reads"].count("__float__") == 6


def test_nonfinite_step_is_skipped_on_the_device(tmp_path, host_reads):
    # The skip itself (found_inf in AdamW, momentum 1 in the EMA) needs no host read either.
    nan_at_2 = lambda step, loss: loss * float("nan") if step == 2 else loss  # noqa: E731
    run = train(_cfg(tmp_path / "run"), loss_hook=nan_at_2)
    assert host_reads["reads"] == []
    with open(os.path.join(run, "metrics.csv")) as f:
        assert [r["nonfinite"] for r in csv.DictReader(f)] == ["0", "0", "1", "0", "0", "0"]
