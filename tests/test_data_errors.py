"""Dataset errors of iwm-train: one line, exit status 2, before anything is written to the run directory (a
resume's config.yaml included). The checks are the data registry's, run by check_environment."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from iwm_fast.data.make_shards import main as make_shards
from iwm_fast.train.cli import train_main
from iwm_fast.config import ConfigError, load_config
from iwm_fast.train.environment import check_environment
from iwm_fast.train.loop import train

TINY = ["model.size=tiny", "model.depth=1", "model.patch_size=4", "data.image_size=24", "predictor.depth=1",
        "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2", "train.batch_size=4",
        "train.warmup_steps=1", "train.log_every=1000", "train.device=cpu", "eval.enabled=false",
        "train.steps=4", "train.checkpoint_every=2"]


@pytest.fixture(autouse=True)
def plain_pytorch_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's data path is under test, not the kernels


def _folder(root, n=12):
    rng = np.random.default_rng(0)
    for k in range(n):
        (root / f"c{k % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"c{k % 3}" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    _folder(base / "folder")
    assert make_shards([str(base / "folder"), str(base / "shards"), "--shard-size", "3", "--no-progress"]) == 0
    return base


def _argv(run, *extra):
    return ["configs/demo_cpu.yaml", *TINY, f"train.out_dir={run}", *extra]


def _refused(argv, capsys, pattern):
    with pytest.raises(SystemExit) as e:
        train_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("iwm-train: error:")]
    assert e.value.code == 2 and len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("extra, pattern", [
    (["data.dataset=shards", "data.root={empty}"], r"shard folder .*empty holds no \.tar shards"),
    (["data.dataset=shards"], "data.dataset=shards needs data.root"),
    (["data.dataset=shards", "data.root={shards}", "data.num_workers=5"],
     "4 shards cannot feed 1 ranks x 5 loader workers"),
    (["data.dataset=shards", "data.root={shards}/shard-000000.tar,{base}/nope.tar"], "nope.tar' does not exist"),
    (["data.dataset=imagefolder", "data.root={flat}"], r"data.root .*flat has no class subfolders"),
    (["data.dataset=imagefolder", "data.root={no_images}"], r"holds no \.jpg, \.jpeg or \.png file in its 2 class"),
    (["train.out_dir="], "train.out_dir is empty"),
    (["train.out_dir={a_file}"], "train.out_dir .*a_file is a file, not a folder"),
    (["train.out_dir={a_file}/run"], "is inside .*a_file, which is a file"),
])
def test_bad_data_is_one_line_and_writes_nothing(data, tmp_path, capsys, extra, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    for c in ("a", "b"):
        (tmp_path / "no_images" / c).mkdir(parents=True)
    (tmp_path / "a_file").write_text("not a folder")
    names = dict(empty=tmp_path / "empty", shards=data / "shards", base=tmp_path, flat=tmp_path / "flat",
                 no_images=tmp_path / "no_images", a_file=tmp_path / "a_file")
    run = tmp_path / "run"
    argv = _argv(run) + [e.format(**names) for e in extra]
    _refused(argv, capsys, pattern)
    assert not run.exists() and sorted(os.listdir(tmp_path)) == ["a_file", "empty", "flat", "no_images"]


@pytest.fixture()
def shard_run(data, tmp_path):
    """A shard run killed after step 2 of 4 (checkpoint at step 2), with 2 loader workers."""
    run = tmp_path / "run"
    over = _argv(run, "data.dataset=shards", f"data.root={data / 'shards'}", "data.num_workers=2")[1:]
    train(load_config("configs/demo_cpu.yaml", over), max_steps=2)
    return run


def test_a_shard_resume_with_other_workers_is_refused_and_keeps_config_yaml(data, shard_run, capsys):
    config = (shard_run / "config.yaml").read_bytes()
    for workers, shown in (("1", "0 or 1"), ("3", "3")):  # 0 and 1 workers both read one stream
        _refused(_argv(shard_run, "data.dataset=shards", f"data.root={data / 'shards'}",
                       f"data.num_workers={workers}"),
                 capsys, f"saved with data.num_workers=2 and this run has data.num_workers={shown}: the shard "
                 "order depends on it; resume with data.num_workers=2")
        assert (shard_run / "config.yaml").read_bytes() == config
    cfg = load_config("configs/demo_cpu.yaml", _argv(shard_run, "data.dataset=shards", f"data.root={data / 'shards'}",
                                                     "data.num_workers=2")[1:])
    with pytest.raises(ConfigError, match="saved by 1 processes and this run has 2: the shard order depends"):
        check_environment(cfg, world_size=2)
    check_environment(cfg, world_size=1)  # the same layout resumes


def test_a_shard_set_changed_between_kill_and_resume_is_refused(data, shard_run, tmp_path, capsys):
    import shutil

    config = (shard_run / "config.yaml").read_bytes()
    moved = tmp_path / "moved"
    shutil.copytree(data / "shards", moved)
    argv = _argv(shard_run, "data.dataset=shards", f"data.root={moved}", "data.num_workers=2")
    check_environment(load_config("configs/demo_cpu.yaml", argv[1:]))  # the same set elsewhere: contents count
    shutil.copy(moved / "shard-000001.tar", moved / "shard-000009.tar")  # a shard added by hand
    _refused(argv, capsys, "shard-000009.tar is not listed in manifest.json")
    shutil.rmtree(moved)  # the set written again, with another shard size: a new manifest
    assert make_shards([str(data / "folder"), str(moved), "--shard-size", "2", "--no-progress"]) == 0
    _refused(argv, capsys, r"the shard set changed since the run's last checkpoint \(4 shards then, 6 now\)")
    assert (shard_run / "config.yaml").read_bytes() == config


def test_an_image_folder_changed_between_kill_and_resume_is_refused(data, tmp_path, capsys):
    import shutil

    root = tmp_path / "folder"
    shutil.copytree(data / "folder", root)
    run = tmp_path / "run"
    argv = _argv(run, "data.dataset=imagefolder", f"data.root={root}", "data.num_workers=0")
    train(load_config("configs/demo_cpu.yaml", argv[1:]), max_steps=2)
    config = (run / "config.yaml").read_bytes()
    shutil.copy(root / "c0" / "0.png", root / "c0" / "extra.png")
    _refused(argv, capsys, r"holds 13 images but the run's last checkpoint was taken with 12")
    assert (run / "config.yaml").read_bytes() == config
