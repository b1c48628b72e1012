"""Tar shards: the converter (its manifest, resuming it, unreadable sources), splitting over ranks and
workers, exact resume, corrupt members; the dataset registry and the data.decode=gpu fallback."""
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from iwm_fast.data import UnreadableImageWarning, registry
from iwm_fast.data.make_shards import index_shards, main as make_shards
from iwm_fast.data.manifest import ShardSetError, hash_file, shard_set
from iwm_fast.data.shards import ShardDataset, ShardLoader, read_samples
from iwm_fast.config import ConfigError, load_config

N_IMAGES = 23


def _image_folder(root, n=N_IMAGES):
    rng = np.random.default_rng(0)
    for k in range(n):
        cls = f"c{k % 3}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (14 + k % 5, 18 + k % 4, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / cls / f"{k:03d}.{'png' if k % 4 == 0 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    src = _image_folder(base / "folder")
    assert make_shards([str(src), str(base / "out"), "--shard-size", "3", "--no-progress"]) == 0
    return base


def test_converter_writes_every_file_once_with_its_label(shard_dir):
    out = shard_dir / "out"
    shards = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    assert len(shards) == -(-N_IMAGES // 3) and not [p for p in os.listdir(out) if p.endswith(".partial")]
    assert (out / "classes.txt").read_text().split() == ["c0", "c1", "c2"]
    source = {}
    for cls in ("c0", "c1", "c2"):
        for f in os.listdir(shard_dir / "folder" / cls):
            source[(shard_dir / "folder" / cls / f).read_bytes()] = int(cls[1])
    seen = []
    for s in shards:
        for _, _, group in read_samples(str(out / s)):
            image = group.get("jpg", group.get("png"))
            assert source[image] == int(group["cls"])
            seen.append(image)
    assert sorted(seen) == sorted(source)  # every file exactly once
    sizes = [sum(1 for _ in read_samples(str(out / s))) for s in shards]
    assert sizes == [3] * (N_IMAGES // 3) + [N_IMAGES % 3]
    labels = [int(g["cls"]) for _, _, g in read_samples(str(out / shards[0]))] + \
        [int(g["cls"]) for _, _, g in read_samples(str(out / shards[1]))]
    assert len(set(labels)) > 1  # shuffled: the first shards are not one class
    # The manifest, written last, records what is on disk: sizes, checksums, counts, classes.
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["name"] for m in manifest["shards"]] == shards and not (out / "conversion.json").exists()
    assert manifest["samples"] == N_IMAGES and manifest["classes"] == ["c0", "c1", "c2"] and not manifest["skipped"]
    for m, size in zip(manifest["shards"], sizes):
        assert m["samples"] == size and m["bytes"] == os.path.getsize(out / m["name"])
        assert m["xxh3_128"] == hash_file(out / m["name"])


def test_converter_errors_are_one_line(shard_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_shards([str(tmp_path / "missing"), str(tmp_path / "o")])
    assert e.value.code == 2 and "is not a directory" in capsys.readouterr().err
    src, out = str(shard_dir / "folder"), str(shard_dir / "out")
    assert make_shards([src, out, "--shard-size", "3", "--no-progress"]) == 0  # the same command: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert make_shards([src, out, "--shard-size", "4", "--no-progress"]) == 2
    assert "complete shard set made otherwise (shard_size: 3 then, 4 now)" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(shard_dir / "out" / "shard-000000.tar", foreign / "x.tar")
    assert make_shards([src, str(foreign), "--no-progress"]) == 2
    assert "already holds .tar shards not written by an unfinished" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert make_shards([str(tmp_path / "empty"), str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no class subfolders" in err and not (tmp_path / "o2").exists()


def test_out_inside_or_equal_to_src_is_refused(tmp_path, capsys):
    src = _image_folder(tmp_path / "folder", n=6)
    for out in (src, src / "shards", src / "c0" / "deeper"):
        assert make_shards([str(src), str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "inside or equal to SRC_IMAGEFOLDER" in err
    assert sorted(os.listdir(src)) == ["c0", "c1", "c2"] and not os.path.exists(src / "c0" / "deeper")


_KILL_AT_ADD = """
import os, signal, sys
import iwm_fast.data.make_shards as m
calls, real = [0], m._add
def add(tar, name, data):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(tar, name, data)
m._add = add
sys.exit(m.main(sys.argv[1:3] + ["--shard-size", "3", "--no-progress"]))
"""


def test_a_killed_conversion_resumes_to_the_same_set(shard_dir, tmp_path, capsys):
    """kill -9 in the middle of the fourth shard, then the same command again: the set is the one an
    uninterrupted conversion writes, byte for byte; until then training refuses the folder."""
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_ADD, str(shard_dir / "folder"), str(out), str(2 * 10 + 1)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    names = sorted(os.listdir(out))
    assert "shard-000002.tar" in names and "shard-000003.tar.partial" in names and "manifest.json" not in names
    with pytest.raises(ShardSetError, match="unfinished iwm-make-shards conversion"):
        shard_set(str(out))
    assert make_shards([str(shard_dir / "folder"), str(out), "--shard-size", "3", "--no-progress"]) == 0
    assert "finished the conversion: 8 shards (23 samples)" in capsys.readouterr().out
    ref = shard_dir / "out"
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        if name.endswith(".tar") or name == "classes.txt":
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert a == b


def test_an_unreadable_source_file_is_skipped_and_listed(tmp_path, capsys):
    src = _image_folder(tmp_path / "folder", n=9)
    os.symlink(tmp_path / "gone.jpg", src / "c1" / "zz_dangling.jpg")  # listed as an image, cannot be opened
    assert make_shards([str(src), str(tmp_path / "out"), "--shard-size", "4", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "wrote 3 shards (9 samples)" in out
    assert "skipped 1 unreadable source file(s)" in err and "c1/zz_dangling.jpg: FileNotFoundError" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["skipped"]] == ["c1/zz_dangling.jpg"] and manifest["samples"] == 9
    found = shard_set(str(tmp_path / "out"))
    assert sum(found.samples) == 9 and found.skipped == 1
    seen = [g.get("jpg", g.get("png")) for p in found.paths for _, _, g in read_samples(p)]
    assert sorted(seen) == sorted(f.read_bytes() for c in ("c0", "c1", "c2") for f in (src / c).iterdir()
                                  if not f.is_symlink())


def test_training_refuses_a_set_that_does_not_match_its_manifest(shard_dir, tmp_path, capsys):
    def fresh(name):
        d = tmp_path / name
        shutil.copytree(shard_dir / "out", d)
        return d

    def refused(root, pattern):
        with pytest.raises(ConfigError, match=pattern):
            registry.check(_cfg("shards", str(root)).data)

    refused(tmp_path / "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "holds no .tar shards")
    d = fresh("no_manifest")
    os.remove(d / "manifest.json")
    refused(d, "has no manifest.json")
    d = fresh("truncated")
    (d / "shard-000001.tar").write_bytes((d / "shard-000001.tar").read_bytes()[:2048])
    refused(d, "shard-000001.tar has 2048 bytes but manifest.json records")
    d = fresh("added")
    shutil.copy(d / "shard-000001.tar", d / "shard-000009.tar")
    refused(d, "shard-000009.tar is not listed in manifest.json")
    d = fresh("missing")
    os.remove(d / "shard-000004.tar")
    refused(d, "shard-000004.tar, listed in manifest.json, is missing")
    refused(f"{shard_dir / 'out' / 'shard-000001.tar'},{tmp_path / 'x.tar'}", "x.tar' does not exist")
    with pytest.raises(ConfigError, match="needs data.root"):
        registry.check(_cfg("shards", "").data)
    with pytest.raises(ConfigError, match="8 shards cannot feed 3 ranks x 3 loader workers"):
        registry.check(_cfg("shards", str(shard_dir / "out"), **{"data.num_workers": 3}).data,
                       world_size=3)
    registry.check(_cfg("shards", str(shard_dir / "out")).data, world_size=2)  # a matching set passes
    # Same size, other bytes: only the checksums tell, which --verify checks.
    d = fresh("flipped")
    data = bytearray((d / "shard-000002.tar").read_bytes())
    data[700] ^= 0xFF
    (d / "shard-000002.tar").write_bytes(bytes(data))
    assert make_shards(["--verify", str(d)]) == 1
    assert "shard-000002.tar: checksum differs" in capsys.readouterr().out
    assert make_shards(["--verify", str(shard_dir / "out")]) == 0


def test_shards_from_another_tool_are_indexed_and_unlabelled_ones_are_named(shard_dir, tmp_path, capsys):
    d = tmp_path / "other"
    shutil.copytree(shard_dir / "out", d)
    os.remove(d / "manifest.json")
    assert make_shards(["--index", str(d)]) == 0
    assert "indexed 8 shards (23 samples, 0 without a .cls label)" in capsys.readouterr().out
    assert json.loads((d / "manifest.json").read_text())["shards"] == \
        json.loads((shard_dir / "out" / "manifest.json").read_text())["shards"]
    assert make_shards(["--index", str(d)]) == 2  # once only
    assert "already has a manifest.json" in capsys.readouterr().err
    bare = tmp_path / "bare"  # images without labels
    bare.mkdir()
    for k in range(2):
        _tar(bare / f"{k}.tar", [(f"{k}{j}.jpg", _jpeg()) for j in range(3)])
    assert make_shards(["--index", str(bare)]) == 0
    with pytest.raises(ConfigError, match="none of the 6 samples of shard set .* has a .cls label"):
        registry.check(_cfg("shards", str(bare)).data)


def _epoch(loader):
    return [(b["indices"].clone(), b["images"].clone(), b["num_skipped"]) for b in loader]


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shard_dir):
    root = str(shard_dir / "out")
    per_epoch = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            ds = ShardDataset(root, image_size=8, seed=4, rank=rank, world_size=2, streams=2)
            loader = ShardLoader(ds, 2, num_workers=2, start_state={**ShardLoader(ds, 2, num_workers=2).state_dict(),
                                                                    "epoch": epoch})
            batches = _epoch(loader)
            assert all(x.shape[1:] == (3, 8, 8) and x.dtype == torch.uint8 for _, x, _ in batches)
            seen += [int(i) for ind, _, _ in batches for i in ind]
        assert len(seen) == len(set(seen)) == N_IMAGES  # each sample exactly once over 2 ranks x 2 workers
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]  # the shard order changes with the epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_bit_identically(shard_dir, num_workers):
    root = str(shard_dir / "out")

    def make(state=None):
        ds = ShardDataset(root, image_size=8, seed=1, rank=1, world_size=2, streams=max(1, num_workers))
        return ShardLoader(ds, 2, num_workers=num_workers, start_state=state)

    per_epoch = len(_epoch(make()))
    reference = _take(make(), per_epoch + 3)
    for cut in (1, per_epoch - 1):  # mid-epoch, and just before a stream runs out
        loader = make()
        first = _take(loader, cut)
        state = loader.state_dict()
        rest = _take(make(state), per_epoch + 3 - cut)
        for (ia, xa), (ib, xb) in zip(reference, first + rest, strict=True):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)
    with pytest.raises(ValueError, match="data.num_workers"):
        ShardLoader(ShardDataset(root, 8, seed=1, rank=1, world_size=2, streams=3), 2, num_workers=3,
                    start_state=state)
    with pytest.raises(ValueError, match="not a shard position"):
        make({"epoch": 0, "position": 3})


def _take(loader, n):
    out = []
    while len(out) < n:
        for b in loader:
            out.append((b["indices"].clone(), b["images"].clone()))
            if len(out) == n:
                break
    return out


def test_every_rank_resumes_from_its_own_shard_position(shard_dir):
    """Ranks read different shards (with seed 6, rank 1 reads the short last shard first), so their positions
    differ: the checkpoint keeps every rank's, and each resumes exactly where it was."""
    root = str(shard_dir / "out")

    def make(rank, state=None):
        return ShardLoader(ShardDataset(root, 8, seed=6, rank=rank, world_size=2), 2, start_state=state)

    reference = [_take(make(r), 8) for r in range(2)]  # into the second epoch
    loaders = [make(r) for r in range(2)]
    first = [_take(loader, 2) for loader in loaders]
    states = [loader.state_dict() for loader in loaders]
    assert states[0]["positions"] != states[1]["positions"]
    merged = json.loads(json.dumps(ShardLoader.merge_states(states)))  # as meta.json holds it
    for r in range(2):
        for (ia, xa), (ib, xb) in zip(reference[r], first[r] + _take(make(r, merged), 6), strict=True):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)
    with pytest.raises(ValueError, match="saved by 2 processes and this run has 1"):
        ShardLoader(ShardDataset(root, 8, seed=6), 2, start_state=merged)


def test_the_eval_split_of_unshuffled_shards_mixes_the_classes(shard_dir, tmp_path):
    out = tmp_path / "sorted"  # class after class: the first 6 samples are all of class c0
    assert make_shards([str(shard_dir / "folder"), str(out), "--shard-size", "3", "--no-shuffle",
                        "--no-progress"]) == 0
    (_, ty), (_, vy) = registry.get("shards").eval_split(_cfg("shards", str(out)).data, seed=0, max_images=6)
    assert len(ty) + len(vy) == 6 and len(set(ty.tolist() + vy.tolist())) > 1 and len(set(ty.tolist())) > 1


def test_shard_workers_ignore_job_signals(shard_dir):
    """SIGTERM and SIGINT to the loader workers (a whole-job signal) leave them running: the main process
    decides what a stop means."""
    from process_tree import alive, epoch_with_signalled_workers

    loader = ShardLoader(ShardDataset(str(shard_dir / "out"), 8, seed=0, streams=2), 2, num_workers=2)
    got, workers = epoch_with_signalled_workers(loader, 2, (signal.SIGTERM, signal.SIGINT))
    assert sum(len(b["indices"]) for b in got) == N_IMAGES
    loader.close()
    assert not any(alive(p) for p in workers)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg():
    good = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), 80, np.uint8)).save(good, "JPEG")
    return good.getvalue()


def test_corrupt_members_are_skipped_and_counted_once(tmp_path):
    good = _jpeg()
    d = tmp_path / "sh"
    d.mkdir()
    _tar(d / "a.tar", [("0.jpg", good), ("0.cls", b"1"), ("1.jpg", b"not a jpeg"), ("1.cls", b"0"),
                       ("2.jpg", good), ("3.jpg", good), ("3.cls", b"2")])            # 1 bad image, 1 no label
    _tar(d / "b.tar", [("0.jpg", good), ("0.cls", b"0"), ("1.png", good), ("1.cls", b"x")])  # bad label
    for name in ("c.tar", "d.tar"):
        _tar(d / name, [(f"{k}.{ext}", good if ext == "jpg" else b"0") for k in range(4) for ext in ("jpg", "cls")])
    index_shards(str(d))
    ds = ShardDataset(str(d), image_size=8, seed=0)
    with tarfile.open(d / "c.tar") as tar:
        members = tar.getmembers()
    # Damaged after the start check: c.tar cut inside its second sample's image (a broken tar), d.tar cut
    # after two whole samples (a tar that reads as shorter).
    (d / "c.tar").write_bytes((d / "c.tar").read_bytes()[:members[2].offset_data + 100])
    (d / "d.tar").write_bytes((d / "d.tar").read_bytes()[:members[4].offset])
    loader = ShardLoader(ds, 4)
    with pytest.warns(UnreadableImageWarning) as caught:
        epoch0 = _epoch(loader)
    messages = " ".join(str(w.message) for w in caught)
    assert "a.tar:1" in messages and "a.tar:2: it has no .cls label" in messages and "b.tar:1" in messages
    assert "c.tar after sample 1: 3 of its 4 samples lost" in messages
    assert "d.tar ended after sample 2: 2 of its 4 samples lost" in messages
    assert sum(len(i) for i, _, _ in epoch0) == 6          # a:0, a:3, b:0, c:0, d:0, d:1
    assert sum(n for _, _, n in epoch0) == 8               # three bad samples and the 3 + 2 the cut shards lost
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        epoch1 = _epoch(loader)
    assert sum(len(i) for i, _, _ in epoch1) == 6 and sum(n for _, _, n in epoch1) == 0  # counted once


def test_shard_count_must_cover_ranks_and_workers(shard_dir):
    with pytest.raises(ValueError, match="cannot feed 4 ranks x 3 loader workers"):
        ShardDataset(str(shard_dir / "out"), 8, rank=0, world_size=4, streams=3)
    with pytest.raises(ShardSetError, match="does not exist"):
        ShardDataset(str(shard_dir / "nope"), 8)


# ----- the registry, shared by the engine and the evaluation -----

def _cfg(dataset, root="", **extra):
    over = [f"data.dataset={dataset}", f"data.root={root}", "data.image_size=8", "model.patch_size=4",
            "data.num_workers=0", "eval.max_train_images=10"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, over)


def test_registry_builds_each_dataset_and_its_eval_split(shard_dir):
    from iwm_fast.data import BundledDigits, ImageFolder
    from iwm_fast.train.data import BatchStream, build_dataset

    assert set(registry.names()) >= {"digits", "imagefolder", "shards"}
    cases = {"digits": ("", BundledDigits), "imagefolder": (str(shard_dir / "folder"), ImageFolder),
             "shards": (str(shard_dir / "out"), ShardDataset)}
    for name, (root, cls) in cases.items():
        cfg = _cfg(name, root)
        assert isinstance(build_dataset(cfg), cls)
        (tx, ty), (vx, vy) = registry.get(name).eval_split(cfg.data, seed=cfg.train.seed,
                                                           max_images=cfg.eval.max_train_images)
        assert tx.shape[1:] == vx.shape[1:] == (3, 8, 8) and len(tx) == len(ty) and len(vx) == len(vy) > 0
        stream = BatchStream(cfg, rank=0, world_size=1, micro_batch=2)
        assert next(stream)["images"].shape == (2, 3, 8, 8)
        assert stream.state_dict()  # a position to checkpoint
    with pytest.raises(ValueError, match="unknown data.dataset 'nope'; choose one of digits, imagefolder, shards"):
        registry.get("nope")


def test_gpu_decode_falls_back_to_the_cpu_with_one_line(shard_dir, caplog):
    from iwm_fast.data import gpu_decode
    from iwm_fast.train.data import BatchStream

    if gpu_decode.unavailable_reason() is None:
        pytest.skip("nvJPEG is usable here: the GPU path is checked on GPU machines")
    for name, root in (("imagefolder", str(shard_dir / "folder")), ("shards", str(shard_dir / "out"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="iwm_fast"):
            gpu = BatchStream(_cfg(name, root, **{"data.decode": "gpu"}), rank=0, world_size=1, micro_batch=3)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and lines[0].startswith("data.decode=gpu: ") and "on the CPU instead" in lines[0]
        cpu = BatchStream(_cfg(name, root), rank=0, world_size=1, micro_batch=3)
        for _ in range(3):
            a, b = next(gpu), next(cpu)
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["indices"], b["indices"])
    with pytest.raises(ValueError, match="data.decode must be one of 'cpu', 'gpu'"):
        BatchStream(_cfg("digits", **{"data.decode": "tpu"}), rank=0, world_size=1, micro_batch=3)


def test_training_from_shards_resumes_bit_identically(shard_dir, tmp_path, monkeypatch):
    """The engine on shards with 2 loader workers: killed after step 3 (checkpoint at 2), resumed, the same."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's data path is under test, not the kernels
    from iwm_fast.train import checkpoint as ckpt
    from iwm_fast.train.loop import train

    def cfg(out):
        return load_config("configs/demo_cpu.yaml", [
            "model.size=tiny", "model.depth=1", "model.patch_size=4", "data.image_size=24", "data.num_workers=2",
            "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2",
            "train.batch_size=4", "train.steps=5", "train.checkpoint_every=2", "train.keep_checkpoints=5",
            "train.log_every=1000", "train.device=cpu", "eval.enabled=false", "data.dataset=shards",
            f"data.root={shard_dir / 'out'}", f"train.out_dir={out}"])

    def final(run):
        from iwm_fast.models import build_iwm

        model = build_iwm(load_config(os.path.join(run, "config.yaml")))
        ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(run, "checkpoints")), model)
        return model.state_dict()

    full = train(cfg(tmp_path / "full"))
    part = tmp_path / "part"
    train(cfg(part), max_steps=3)
    assert ckpt.latest_checkpoint(part / "checkpoints").endswith("step_00000002")
    train(cfg(part))
    with open(os.path.join(full, "metrics.csv")) as a, open(os.path.join(part, "metrics.csv")) as b:
        assert [r.split(",")[1] for r in a] == [r.split(",")[1] for r in b]  # the loss column
    want, got = final(full), final(part)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_gpu_path_crops_like_the_cpu_path_with_a_stand_in_decoder(shard_dir, monkeypatch):
    """The GPU path's own logic (header, box, flip, batch assembly, float resize) run on the CPU, with PIL
    standing in for nvJPEG: the crops match the CPU path within one grey level (nvJPEG itself is checked on
    GPU machines only)."""
    import sys
    import types

    from iwm_fast.data import ImageFolder, collate_skip_bad, decode_image
    from iwm_fast.data import gpu_decode

    fake = types.ModuleType("torchvision.io")
    fake.ImageReadMode = types.SimpleNamespace(UNCHANGED="unchanged")
    fake.decode_jpeg = lambda datas, mode, device: [decode_image(bytes(d.numpy())).to(device) for d in datas]
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake)

    cpu = ImageFolder(str(shard_dir / "folder"), image_size=12, seed=2)
    gpu = ImageFolder(str(shard_dir / "folder"), image_size=12, seed=2)
    gpu.decode_on_gpu = True
    keys = [(1, i) for i in range(len(cpu))]
    items = [gpu[k] for k in keys]
    kinds = {type(it[0]).__name__ for it in items}
    assert kinds == {"JpegCrop", "Tensor"}  # JPEGs go to the device, PNGs are cropped in the worker
    batch = gpu_decode.GpuFinisher(torch.device("cpu")).finish(collate_skip_bad(items, 12))
    want = torch.stack([cpu[k][0] for k in keys])
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == want.shape
    assert (batch["images"].int() - want.int()).abs().max() <= 1
