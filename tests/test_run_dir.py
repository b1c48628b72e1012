"""The run directory: its paths, its config read once, each checkpoint verified once, the fallback to an older
checkpoint that verifies, and one clear error where there is no run or no weights."""
import ast
import collections
import os
import pathlib

import pytest
import torch

from iwm_fast.models import build_iwm
from iwm_fast.run_dir import RunDir
from iwm_fast.train import checkpoint as ckpt
from iwm_fast.config import ConfigError, load_config, to_dict

TINY = ["model.size=tiny", "model.depth=1", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2", "train.batch_size=8",
        "train.warmup_steps=1", "train.log_every=1000", "train.device=cpu", "eval.enabled=false"]
FILES = ("config.yaml", "metrics.csv", "eval.json", "target_encoder.pt", "world_model.png", "loss_curve.png",
         "checkpoints", "tensorboard", "profile_trace.json", "profile_kernels.txt", "outputs.json", ".lock",
         ".outputs.lock")


def tiny_cfg(out_dir, *extra):
    return load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={out_dir}", *extra])


@pytest.fixture
def saved_run(tmp_path):
    """A run directory with config.yaml and checkpoints of steps 1 and 2 holding different weights."""
    run = RunDir(tmp_path / "run")
    cfg = tiny_cfg(run.path)
    run.write_config(cfg)
    model = build_iwm(cfg)
    opt = torch.optim.AdamW(model.parameters())
    states = {}
    for step in (1, 2):
        with torch.no_grad():
            model.predictor.predictor_embed.weight.add_(float(step))
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.save_checkpoint(run.checkpoints_dir, step, model, opt, {}, keep=5)
    return run.path, states


@pytest.fixture
def hashed(monkeypatch):
    """How many times each checkpoint file is hashed (a verification hashes every file of a checkpoint)."""
    counts = collections.Counter()
    real = ckpt._hash_file

    def counting(path):
        counts[os.path.relpath(path, os.path.dirname(os.path.dirname(path)))] += 1  # step_.../file
        return real(path)

    monkeypatch.setattr(ckpt, "_hash_file", counting)
    return counts


def test_paths_are_the_runs_files(tmp_path):
    run = RunDir(tmp_path)
    got = [run.config_path, run.metrics_path, run.eval_path, run.export_path, run.world_model_png,
           run.loss_curve_png, run.checkpoints_dir, run.tensorboard_dir, run.profile_trace_path,
           run.profile_table_path, run.outputs_path, run.lock_path, run.outputs_lock_path]
    assert got == [os.path.join(str(tmp_path), f) for f in FILES]
    assert RunDir(run).path == run.path == str(tmp_path)
    assert run.finetune_path("finetune_predictor") == os.path.join(str(tmp_path), "finetune_predictor.json")
    sub = run.finetune_run("finetune_predictor")
    assert sub.checkpoints_dir == os.path.join(str(tmp_path), "finetune_predictor", "checkpoints")


def test_no_other_module_names_a_run_file():
    # Every path of a run is RunDir's: a file name written as a string literal anywhere else is a second owner.
    root = pathlib.Path(__file__).resolve().parent.parent / "iwm_fast"
    owners = collections.defaultdict(list)
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in FILES:
                owners[node.value].append(str(path.relative_to(root)))
    assert {name: sorted(set(mods)) for name, mods in owners.items()} == {name: ["run_dir.py"] for name in FILES}


def test_config_is_read_once_and_overrides_leave_the_saved_one(tmp_path, monkeypatch):
    import iwm_fast.run_dir as run_dir_mod

    run = RunDir(tmp_path)
    run.write_config(tiny_cfg(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # no temporary file left
    reads = []
    real = run_dir_mod._read_yaml
    monkeypatch.setattr(run_dir_mod, "_read_yaml", lambda path: reads.append(path) or real(path))
    fresh = RunDir(tmp_path)
    a = fresh.read_config()
    a.train.steps = 12345  # a caller's change does not reach the next caller
    b = fresh.read_config(["eval.bank_size=8"])
    c = fresh.read_config()
    assert reads == [fresh.config_path]
    assert b.eval.bank_size == 8 and c.eval.bank_size != 8 and c.train.steps != 12345
    assert to_dict(c) == to_dict(load_config(fresh.config_path))


def test_a_failed_config_write_keeps_the_old_file(tmp_path, monkeypatch):
    import yaml

    run = RunDir(tmp_path)
    run.write_config(tiny_cfg(tmp_path, "train.steps=7"))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(yaml, "safe_dump", disk_full)
    with pytest.raises(OSError):
        run.write_config(tiny_cfg(tmp_path, "train.steps=9"))
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]
    assert RunDir(tmp_path).read_config().train.steps == 7


def test_config_errors_name_the_file_or_the_override(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run directory: it has no config.yaml"):
        RunDir(tmp_path).read_config()
    run = RunDir(tmp_path)
    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(ConfigError, match="config.yaml is empty, so this run's config is unknown"):
        run.read_config()
    (tmp_path / "config.yaml").write_text("train:\n  steps: 3\n   lr: 1\n")
    with pytest.raises(ConfigError, match="config.yaml is not a valid run config .*not valid YAML.*restore it"):
        RunDir(tmp_path).read_config()
    RunDir(tmp_path).write_config(tiny_cfg(tmp_path))
    for override, reason in (("eval.bank_size=1", "eval.bank_size must be an integer >= 2"),
                             ("eval.bank_sise=8", "unknown config key 'eval.bank_sise'")):
        with pytest.raises(ConfigError, match=f"bad override {override}: {reason}") as e:
            RunDir(tmp_path).read_config([override])
        assert "restore" not in str(e.value) and "delete" not in str(e.value)


def test_each_checkpoint_is_verified_once(saved_run, hashed):
    path, states = saved_run
    run = RunDir(path)
    for _ in range(3):
        assert run.latest_checkpoint().endswith("step_00000002")
    loaded = run.load_model()
    assert loaded.step == 2 and loaded.checkpoint.endswith("step_00000002")
    assert hashed and set(hashed.values()) == {1}
    assert all(name.startswith("step_00000002") for name in hashed)
    assert all(torch.equal(v, states[2][k]) for k, v in loaded.model.state_dict().items())
    RunDir(path).latest_checkpoint()  # another RunDir (another start) verifies again
    assert set(hashed.values()) == {2}


def test_a_damaged_newest_checkpoint_falls_back_to_an_older_one(saved_run, hashed, caplog):
    path, states = saved_run
    run = RunDir(path)
    newest = os.path.join(run.checkpoints_dir, "step_00000002")
    with open(os.path.join(newest, "rng_rank0.pt"), "r+b") as f:
        f.truncate(10)
    with caplog.at_level("WARNING", logger="iwm_fast"):
        loaded = run.load_model()
    assert loaded.step == 1 and loaded.checkpoint.endswith("step_00000001")
    assert all(torch.equal(v, states[1][k]) for k, v in loaded.model.state_dict().items())
    assert "step_00000002/rng_rank0.pt is truncated" in caplog.text and "falling back to" in caplog.text
    run.latest_checkpoint()
    assert hashed and max(hashed.values()) == 1  # the damaged one and the good one, each read once


def test_a_checkpoint_saved_again_replaces_the_damaged_one(saved_run):
    from iwm_fast.train.checkpointer import Checkpointer

    path, _ = saved_run
    run = RunDir(path)
    newest = os.path.join(run.checkpoints_dir, "step_00000002")
    with open(os.path.join(newest, "rng_rank0.pt"), "r+b") as f:
        f.truncate(10)
    saver = Checkpointer(run, every=1, total_steps=2, keep=5, rank=0)
    assert saver.latest.endswith("step_00000001")
    model = build_iwm(run.read_config())
    saver.save(2, model, torch.optim.AdamW(model.parameters()), {})
    assert run.latest_checkpoint() == newest  # the memo of the damaged one is replaced by the save


def test_no_run_or_no_weights_is_one_clear_error(saved_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run directory: it has no config.yaml"):
        RunDir(tmp_path / "nowhere").load_model()
    path, _ = saved_run
    run = RunDir(path)
    for step in (1, 2):
        with open(os.path.join(run.checkpoints_dir, f"step_0000000{step}", "rng_rank0.pt"), "r+b") as f:
            f.truncate(10)
    with pytest.raises(FileNotFoundError, match="holds no weights: no complete checkpoint that verifies"):
        run.load_model()


def test_a_resumed_start_reads_the_config_once_and_verifies_once(tmp_path, monkeypatch, hashed):
    import builtins

    from iwm_fast.train.loop import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "run"
    train(tiny_cfg(out, "train.steps=2", "train.checkpoint_every=2"))
    hashed.clear()
    opened = collections.Counter()
    real_open = builtins.open

    def counting_open(file, mode="r", *a, **k):
        if "r" in mode and str(file).endswith("config.yaml"):
            opened[str(file)] += 1
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", counting_open)
    train(tiny_cfg(out, "train.steps=3", "train.checkpoint_every=2"))
    assert opened == {str(out / "config.yaml"): 1}
    resumed = {n: c for n, c in hashed.items() if n.startswith("step_00000002")}
    assert resumed and set(resumed.values()) == {1}


def test_a_checkpoint_rotated_away_while_it_is_read_falls_back_and_says_so(saved_run, monkeypatch, caplog):
    # A running trainer removes old checkpoints after each save: one that vanishes between its verification and
    # its load must not be reported as a damaged file; the newest one left is loaded.
    import shutil

    path, states = saved_run
    run = RunDir(path)
    real, calls = ckpt.load_checkpoint, []

    def rotated_first(folder, *a, **k):
        calls.append(folder)
        if len(calls) == 1:
            shutil.rmtree(folder)  # the trainer's rotation, in the middle of the read
        return real(folder, *a, **k)

    monkeypatch.setattr(ckpt, "load_checkpoint", rotated_first)
    with caplog.at_level("WARNING", logger="iwm_fast"):
        loaded = run.load_model()
    assert [os.path.basename(c) for c in calls] == ["step_00000002", "step_00000001"]
    assert loaded.step == 1 and all(torch.equal(loaded.model.state_dict()[k], v) for k, v in states[1].items())
    assert "step_00000002 was removed while it was read" in caplog.text and ".metadata" not in caplog.text


def test_outputs_are_current_only_for_the_checkpoint_they_record(saved_run):
    path, _ = saved_run
    run = RunDir(path)
    first, second = (run.checkpoint_record(os.path.join(run.checkpoints_dir, f"step_0000000{s}")) for s in (1, 2))
    assert first["step"] == 1 and second["step"] == 2 and first["digest"] != second["digest"]
    assert not run.is_current(run.eval_path, second)  # no file
    with open(run.eval_path, "w") as f:
        f.write("{}")
    assert not run.is_current(run.eval_path, second)  # a file no record vouches for
    run.record_output(run.eval_path, second)
    assert run.is_current(run.eval_path, second) and not run.is_current(run.eval_path, first)
    with open(run.outputs_path, "w") as f:
        f.write("{not json")
    assert not run.is_current(run.eval_path, second)  # a damaged record vouches for nothing
