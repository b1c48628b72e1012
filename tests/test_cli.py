"""iwm-train / iwm-eval on bad input: one line on stderr, exit status 2, nothing written to the run directory."""
import errno
import os

import pytest
import torch

from iwm_fast.train import checkpoint as ckpt
from iwm_fast.train.cli import eval_main, train_main

# The engine tests' tiny run (tests/test_engine.py), with a 2-block encoder to keep these quick.
TINY = ["model.size=tiny", "model.depth=2", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2",
        "train.batch_size=8", "train.warmup_steps=5", "train.lr=5e-4", "train.log_every=1000",
        "train.device=cpu", "eval.enabled=false"]
EVAL = ["eval.num_queries=4", "eval.bank_size=8", "eval.probe_epochs=5", "eval.max_train_images=64"]


@pytest.fixture(autouse=True)
def plain_pytorch_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's logic is under test, not the kernels


def _exit_code(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err


def _train(run, *extra):
    return train_main(["configs/demo_cpu.yaml", *TINY, f"train.out_dir={run}", *extra])


def _one_line_error(code, err, pattern, prog="iwm-train"):
    import re
    assert code == 2
    errors = [line for line in err if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("extra, pattern", [
    (["train.steps=0"], "train.steps must be an integer >= 1"),
    (["train.checkpoint_every=0"], "train.checkpoint_every must be an integer >= 1"),
    (["train.device=bogus"], "train.device must be one of"),
    (["train.lr=inf"], "train.lr must be a finite number"),
    (["predictor.width=0", "predictor.preset="], "predictor.width must be an integer >= 1"),
    (["train.batch_size=9", "train.accum_steps=2"], "train.batch_size=9 must be divisible by the world size 1"),
    (["data.dataset=imagefolder", "data.root=/nonexistent/images"], "data.root /nonexistent/images does not "
                                                                     "exist"),
    (["train.steps=[1,"], "is not a valid YAML value"),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, capsys, extra, pattern):
    run = tmp_path / "run"
    code, err = _exit_code(train_main, ["configs/demo_cpu.yaml", *TINY, f"train.out_dir={run}", *extra], capsys)
    _one_line_error(code, err, pattern)
    assert not run.exists()


def test_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _exit_code(train_main, ["configs/demo_cpu.yaml", *TINY, "train.device=cuda",
                                        f"train.out_dir={tmp_path / 'run'}"], capsys)
    _one_line_error(code, err, "train.device=cuda but no CUDA device is visible")
    assert not (tmp_path / "run").exists()


def test_bad_config_files(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n   lr: 1\n")
    _one_line_error(*_exit_code(train_main, [str(bad)], capsys), r"bad.yaml is not valid YAML at line 3")
    _one_line_error(*_exit_code(train_main, [str(tmp_path)], capsys), "is a folder, not a YAML file")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x80\x02\xff\xfe" * 100)
    _one_line_error(*_exit_code(train_main, [str(binary)], capsys), "weights.bin is not a text file")
    _one_line_error(*_exit_code(train_main, [str(tmp_path / "missing.yaml")], capsys), "does not exist")
    twice = tmp_path / "twice.yaml"
    # Were the second section kept silently, the run would stop on its steps=0 instead (and never train).
    twice.write_text(f"train:\n  out_dir: {tmp_path / 'run'}\nmodel:\n  size: tiny\ntrain:\n  steps: 0\n")
    _one_line_error(*_exit_code(train_main, [str(twice)], capsys), r"twice.yaml gives 'train' twice \(lines 1 and 5\)")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    import pytest as _pytest
    mp = _pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    run = tmp_path_factory.mktemp("cli") / "run"
    assert _train(run, "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=3") == 0
    mp.undo()
    return run


def test_iwm_eval_takes_only_eval_overrides(finished_run, capsys):
    before = sorted(os.listdir(finished_run))
    code, err = _exit_code(eval_main, [str(finished_run), "model.depth=1"], capsys)
    _one_line_error(code, err, r"iwm-eval takes only eval\.\* \(and train.device\) overrides, got 'model.depth=1'",
                    prog="iwm-eval")
    assert sorted(os.listdir(finished_run)) == before


def test_iwm_eval_on_a_read_only_run_prints_its_results(finished_run, capsys, monkeypatch, caplog):
    from iwm_fast.train import evaluate

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(evaluate, "write_eval", read_only)
    monkeypatch.setattr(evaluate, "plot_loss_curve", read_only)
    with caplog.at_level("WARNING", logger="iwm_fast"):
        assert eval_main([str(finished_run), *EVAL]) == 0
    out = capsys.readouterr().out
    assert "probe_acc" in out and "mrr" in out
    assert "could not write the results" in caplog.text and "Read-only file system" in caplog.text


def test_iwm_eval_writes_a_missing_target_encoder(finished_run, capsys):
    path = finished_run / "target_encoder.pt"
    want = torch.load(path)
    os.remove(path)  # as if the run was killed between its last checkpoint and the export
    assert eval_main([str(finished_run), *EVAL]) == 0
    got = torch.load(path)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_iwm_eval_on_an_emptied_config(finished_run, capsys, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "config.yaml").write_text("")
    _one_line_error(*_exit_code(eval_main, [str(run)], capsys), r"config.yaml is empty, so this run's config is "
                    "unknown", prog="iwm-eval")


def test_resume_with_a_smaller_model_after_config_is_gone_is_refused(finished_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    os.remove(run / "config.yaml")
    code, err = _exit_code(train_main, ["configs/demo_cpu.yaml", *TINY, f"train.out_dir={run}", "model.depth=1",
                                        "train.steps=3"], capsys)
    _one_line_error(code, err, r"step_00000002 holds a different model: it has \d+ keys the model lacks "
                               r"\(encoder.blocks.1.\*")


def test_resume_with_an_emptied_config_says_so(finished_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "config.yaml").write_text("")
    code, err = _exit_code(train_main, ["configs/demo_cpu.yaml", *TINY, f"train.out_dir={run}", "train.steps=3"],
                           capsys)
    _one_line_error(code, err, "config.yaml is empty")
    assert not any("different run" in line for line in err)


def test_iwm_eval_falls_back_past_a_damaged_checkpoint(finished_run, tmp_path, capsys, caplog):
    import json
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    with open(run / "checkpoints" / "step_00000002" / "rng_rank0.pt", "r+b") as f:
        f.truncate(10)
    with caplog.at_level("WARNING", logger="iwm_fast"):
        assert eval_main([str(run), *EVAL]) == 0
    assert "step_00000002/rng_rank0.pt is truncated" in caplog.text
    with open(run / "eval.json") as f:
        assert json.load(f)["step"] == 1
    assert ckpt.latest_checkpoint(str(run / "checkpoints")).endswith("step_00000001")
