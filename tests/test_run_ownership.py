"""One writer per run directory, outputs of the final checkpoint only, and results that outlive a read-only run.

iwm-train and iwm-finetune hold the run directory's writer lock (a second one is refused in one line, a killed
holder never blocks a rerun, under torchrun rank 0 holds it for all); every output records the checkpoint it
came from and the end of a run redoes any other (an extended run, a retrained model, an iwm-eval of a mid-run
checkpoint); a fine-tune of a superseded pretraining starts afresh; a read-only run directory still prints
every result.
"""
import builtins
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from iwm_fast.config import load_config
from iwm_fast.finetune import FinetuneArgs, run_finetune
from iwm_fast.finetune.cli import main as finetune_main
from iwm_fast.models import build_iwm
from iwm_fast.run_dir import RunDir
from iwm_fast.run_lock import RunInUseError, RunLock
from iwm_fast.train import checkpoint as ckpt
from iwm_fast.train.cli import eval_main, train_main
from iwm_fast.train.loop import train

TINY = ["model.size=tiny", "model.depth=1", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2", "train.batch_size=8",
        "train.warmup_steps=1", "train.log_every=1", "train.device=cpu", "train.steps=4",
        "train.checkpoint_every=2", "train.keep_checkpoints=5", "eval.enabled=false", "eval.num_queries=2",
        "eval.bank_size=4", "eval.probe_epochs=1", "eval.max_train_images=40"]
OUTPUTS = ("target_encoder.pt", "eval.json", "world_model.png", "loss_curve.png")
QUICK = dict(epochs=1, batch_size=16, lr=1e-3)


@pytest.fixture(autouse=True)
def plain_pytorch_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's logic is under test, not the kernels


def _cfg(run, *extra):
    return load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={run}", *extra])


def _argv(run, *extra):
    return ["configs/demo_cpu.yaml", *TINY, f"train.out_dir={run}", *extra]


def _refused(main, argv, capsys, pattern, prog):
    import re
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"{prog}: error:")]
    assert e.value.code == 2 and len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert not any("Traceback" in line or line.startswith("usage:") for line in err), err


def _records(run):
    with open(os.path.join(run, "outputs.json")) as f:
        return json.load(f)


def _export_of(run, step):
    """The target encoder of ``run``'s step-``step`` checkpoint, read independently of the export."""
    model = build_iwm(RunDir(run).read_config())
    ckpt.load_checkpoint(os.path.join(run, "checkpoints", f"step_{step:08d}"), model)
    return {k: v for k, v in model.target_encoder.state_dict().items()}


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with its evaluation (every output of a run)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    run = tmp_path_factory.mktemp("own") / "run"
    train(_cfg(run, "eval.enabled=true"))
    mp.undo()
    return run


# ---------------------------------------------------------------- one writer

def test_a_second_writer_is_refused_in_one_line_before_anything_is_written(finished, tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(RunDir(run), "the first trainer").acquire():
        _refused(train_main, _argv(run), capsys, r"run is in use by another writer \(the first trainer pid \d+",
                 "iwm-train")
        assert os.listdir(run) == [".lock"]  # no config.yaml, no metrics.csv, no checkpoints
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    with RunLock(RunDir(copy), "iwm-train").acquire():
        before = {p: os.path.getmtime(os.path.join(copy, p)) for p in os.listdir(copy)}
        _refused(finetune_main, [str(copy), "--protocol", "probe"], capsys, "copy is in use by another writer",
                 "iwm-finetune")
    assert {p: os.path.getmtime(os.path.join(copy, p)) for p in os.listdir(copy)} == before


def test_a_lock_left_by_a_killed_process_never_blocks_a_rerun(tmp_path):
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from iwm_fast.run_dir import RunDir; from iwm_fast.run_lock import RunLock; "
        f"RunLock(RunDir({run.path!r}), 'holder').acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match="holder pid"):
            RunLock(run, "second").acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run, "rerun").acquire() as lock:  # the kernel dropped the killed holder's flock
        assert lock.fd is not None


def _rank_main(rank, store, run, queue):
    import torch.distributed as dist

    from iwm_fast.run_lock import lock_run
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        lock = lock_run(RunDir(run), "iwm-train", rank)
        queue.put((rank, "held" if lock.fd is not None else "stand-in"))
        dist.barrier()
        lock.release()
    except RunInUseError as e:
        queue.put((rank, f"refused: {e}"))
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path, name, run):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / name), str(run), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    return got


def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_learns_the_outcome(tmp_path):
    run = tmp_path / "run"
    assert _two_ranks(tmp_path, "store1", run) == {0: "held", 1: "stand-in"}
    with RunLock(RunDir(run), "another job").acquire():
        got = _two_ranks(tmp_path, "store2", run)
    assert all(v.startswith("refused:") and "another job" in v for v in got.values()), got


# ---------------------------------------------------------------- outputs of the final checkpoint

def test_an_extended_run_refreshes_every_output(finished, tmp_path):
    run = tmp_path / "extended"
    shutil.copytree(finished, run)
    assert all(r["step"] == 4 for r in _records(run).values()) and sorted(_records(run)) == sorted(OUTPUTS)
    train(_cfg(run, "eval.enabled=true", "train.steps=8"))
    with open(run / "eval.json") as f:
        assert json.load(f)["step"] == 8
    records = _records(run)
    assert sorted(records) == sorted(OUTPUTS)
    assert all(r["step"] == 8 and r["checkpoint"] == "step_00000008" for r in records.values()), records
    assert _same(torch.load(run / "target_encoder.pt"), _export_of(run, 8))


def test_retraining_another_model_never_keeps_the_old_export(finished, tmp_path):
    run = tmp_path / "retrained"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")
    train(_cfg(run, "model.depth=2"))  # eval disabled: its old files stay, with a warning
    assert _same(torch.load(run / "target_encoder.pt"), _export_of(run, 4))
    assert any(k.startswith("blocks.1.") for k in torch.load(run / "target_encoder.pt"))


def test_iwm_eval_at_a_mid_run_checkpoint_then_the_run_finishing(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "eval.enabled=true"), max_steps=2)
    # iwm-eval takes no lock: it runs beside a trainer that holds the run directory.
    with RunLock(RunDir(run), "a trainer").acquire():
        assert eval_main([str(run)]) == 0
    with open(run / "eval.json") as f:
        assert json.load(f)["step"] == 2
    assert not (run / "target_encoder.pt").exists()  # a run at step 2 of 4 has no trained encoder yet
    train(_cfg(run, "eval.enabled=true"))
    with open(run / "eval.json") as f:
        assert json.load(f)["step"] == 4
    assert all(r["step"] == 4 for r in _records(run).values())


def test_iwm_eval_refreshes_an_outdated_target_encoder(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    stale = {k: torch.zeros_like(v) for k, v in torch.load(run / "target_encoder.pt").items()}
    torch.save(stale, run / "target_encoder.pt")
    RunDir(run).record_output(str(run / "target_encoder.pt"), {"step": 2, "checkpoint": "step_00000002",
                                                                "digest": "an older one"})
    assert eval_main([str(run)]) == 0
    assert _same(torch.load(run / "target_encoder.pt"), _export_of(run, 4))


def test_a_rerun_of_a_finished_run_keeps_its_current_outputs(finished, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {name: os.path.getmtime(run / name) for name in OUTPUTS}
    with caplog.at_level("INFO", logger="iwm_fast"):
        train(_cfg(run, "eval.enabled=true"))
    assert "already finished" in caplog.text and "not of the final checkpoint" not in caplog.text
    assert {name: os.path.getmtime(run / name) for name in OUTPUTS} == before


def test_a_foreign_metrics_csv_is_refused_and_kept(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,accuracy\n1,0.5\n")
    _refused(train_main, _argv(run), capsys, r"metrics.csv is not a metrics file of this engine", "iwm-train")
    assert (run / "metrics.csv").read_text() == "epoch,accuracy\n1,0.5\n"
    assert sorted(os.listdir(run)) == [".lock", "metrics.csv"]  # no config.yaml


# ---------------------------------------------------------------- fine-tuning

def test_a_finetune_of_a_superseded_pretraining_starts_afresh(tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="iwm_fast"):
        train(_cfg(run), max_steps=2)
        run_finetune(str(run), FinetuneArgs(protocol="predictor", **QUICK))
    assert "is at step 2 of its train.steps=4: fine-tuning an unfinished pretraining" in caplog.text
    train(_cfg(run))  # pretraining moves on to step 4
    reference = tmp_path / "reference"  # the same fine-tuning, started on the step-4 run from nothing
    shutil.copytree(run, reference, ignore=shutil.ignore_patterns("finetune_*"))
    ref_res, ref_net = run_finetune(str(reference), FinetuneArgs(protocol="predictor", **QUICK))
    caplog.clear()
    with caplog.at_level("INFO", logger="iwm_fast"):
        res, net = run_finetune(str(run), FinetuneArgs(protocol="predictor", **QUICK))
    assert "fine-tuned the step-2 pretraining checkpoint, not the run's newest (step 4): starting afresh" in \
        caplog.text and "resumed" not in caplog.text and "unfinished" not in caplog.text
    assert res["pretrain_step"] == 4 and res["val_accuracy_per_epoch"] == ref_res["val_accuracy_per_epoch"]
    a, b = ckpt.full_model_state(net), ckpt.full_model_state(ref_net)
    assert all(torch.equal(a[k], b[k]) for k in b)


def _one_class_folder(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "only").mkdir(parents=True)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "only" / f"{i}.png")
    return root


def test_one_class_warns_that_accuracy_is_meaningless(finished, tmp_path, caplog):
    root = _one_class_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with caplog.at_level("WARNING", logger="iwm_fast"):
        res, _ = run_finetune(str(run), FinetuneArgs(protocol="probe", data_root=str(root), **QUICK))
    assert res["accuracy"] == 1.0 and res["num_classes"] == 1
    lines = [r.getMessage() for r in caplog.records if "one class only" in r.getMessage()]
    assert len(lines) == 2 and all("accuracy is meaningless" in line and "\n" not in line for line in lines)


def test_iwm_finetune_runtime_errors_are_one_line_without_the_usage(tmp_path, capsys):
    _refused(finetune_main, [str(tmp_path / "nowhere")], capsys, "is not a run directory", "iwm-finetune")


# ---------------------------------------------------------------- a read-only run directory

@pytest.fixture
def read_only(monkeypatch):
    """Make every write under the folders in the returned set fail as on a read-only file system (running as
    root, chmod cannot): opening for writing, creating, renaming and removing."""
    folders = set()

    def blocked(path):
        path = os.path.abspath(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
        return any(path == f or path.startswith(f + os.sep) for f in folders)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def wrap(real, is_write):
        def guarded(path, *a, **k):
            if blocked(path) and is_write(*a, **k):
                refuse(path)
            return real(path, *a, **k)
        return guarded

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    monkeypatch.setattr(builtins, "open", wrap(builtins.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+")))
    monkeypatch.setattr(os, "open", wrap(os.open, lambda flags, *a, **k: bool(flags & writes)))
    for name in ("makedirs", "mkdir", "remove", "unlink", "rmdir", "replace", "rename"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name), lambda *a, **k: True))
    return folders


@pytest.mark.parametrize("protocol", ["probe", "predictor"])
def test_iwm_finetune_on_a_read_only_run_prints_its_results(finished, tmp_path, capsys, caplog, read_only,
                                                            protocol):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = sorted(os.listdir(run))
    read_only.add(str(run))
    with caplog.at_level("WARNING", logger="iwm_fast"):
        assert finetune_main([str(run), "--protocol", protocol, "--epochs", "1", "--batch-size", "16"]) == 0
    out, err = capsys.readouterr()
    assert f"finetune_{protocol}: accuracy " in out and "not saved" in out and "Traceback" not in err
    assert "could not save the results to" in caplog.text and "Read-only file system" in caplog.text
    assert sorted(os.listdir(run)) == before


def test_iwm_eval_on_a_read_only_run_prints_its_results(finished, tmp_path, capsys, caplog, read_only):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    read_only.add(str(run))
    with caplog.at_level("WARNING", logger="iwm_fast"):
        assert eval_main([str(run)]) == 0
    out, err = capsys.readouterr()
    assert "probe_acc" in out and "mrr" in out and "Traceback" not in err
    assert "could not write to" in caplog.text and "Read-only file system" in caplog.text


def test_iwm_eval_keeps_its_results_when_the_picture_cannot_be_written(finished, tmp_path, capsys, caplog,
                                                                     read_only):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    read_only.add(str(run / "world_model.png"))
    with caplog.at_level("WARNING", logger="iwm_fast"):
        assert eval_main([str(run)]) == 0
    assert "probe_acc" in capsys.readouterr().out and "could not write the world-model picture" in caplog.text
    with open(run / "eval.json") as f:
        assert json.load(f)["step"] == 4
    assert "world_model.png" not in _records(run)  # the old picture is no longer vouched for
