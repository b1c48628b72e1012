"""Checkpoints: strict loads, checksums with fallback to the newest one that verifies, a full disk said plainly."""
import errno
import json
import os

import pytest
import torch

from iwm_fast.train import checkpoint as ckpt


class Net(torch.nn.Module):
    def __init__(self, depth=2, width=8):
        super().__init__()
        self.embed = torch.nn.Linear(4, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))


def _saved(tmp_path, steps=(1, 2), **net):
    torch.manual_seed(0)
    model = Net(**net)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    d = tmp_path / "checkpoints"
    paths = []
    for s in steps:
        opt.step()
        paths.append(ckpt.save_checkpoint(str(d), s, model, opt, {"data": {"position": s}}, keep=5))
    return str(d), paths, model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_meta_records_every_file_and_a_round_trip_restores_the_model(tmp_path):
    d, (_, last), model = _saved(tmp_path)
    meta = json.load(open(os.path.join(last, "meta.json")))
    on_disk = sorted(n for n in os.listdir(last) if n != "meta.json")
    assert sorted(meta["files"]) == on_disk and meta["hash"] == "xxh3_128"
    for name, rec in meta["files"].items():
        assert rec["bytes"] == os.path.getsize(os.path.join(last, name))
    other = Net()
    assert ckpt.load_checkpoint(last, other)["step"] == 2
    want = _state(model)
    assert all(torch.equal(want[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("make, expect", [
    (lambda: Net(depth=1), r"holds a different model: it has 2 keys the model lacks \(blocks\.1\.\*\)"),
    (lambda: Net(depth=3), r"the model has 2 keys it lacks \(blocks\.2\.\*\)"),
    (lambda: Net(width=16), r"shape of blocks\.0\.bias: \[8\] in the checkpoint vs \[16\] in the model"),
])
def test_a_checkpoint_of_another_model_is_refused_naming_the_differences(tmp_path, make, expect):
    _, (_, last), _ = _saved(tmp_path)
    model = make()
    before = _state(model)
    with pytest.raises(ckpt.CheckpointError, match=expect):
        ckpt.load_checkpoint(last, model)
    with pytest.raises(ckpt.CheckpointError, match="step_00000002"):
        ckpt.load_checkpoint(last, model, torch.optim.AdamW(model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left untouched


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _edit(path, old, new):
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "bit flip in a shard": ("__0_0.distcp", lambda p: _flip(p, os.path.getsize(p) // 2), "is corrupted"),
    "truncated shard": ("__0_0.distcp", _truncate, "is truncated"),
    "truncated rng state": ("rng_rank0.pt", _truncate, "is truncated"),
    "bit flip in DCP metadata": (".metadata", lambda p: _flip(p, 40), "is corrupted"),
    "meta.json not JSON": ("meta.json", lambda p: open(p, "w").write('{"step": 2, "fi'), "meta.json is unreadable"),
    "meta.json edited": ("meta.json", lambda p: _edit(p, '"step": 2', '"step": 7'), "meta.json is damaged"),
    "shard deleted": ("__0_0.distcp", os.remove, "is missing"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_named_and_skipped(tmp_path, case, caplog):
    d, (first, last), model = _saved(tmp_path)
    name, damage, reason = DAMAGE[case]
    damage(os.path.join(last, name))
    with pytest.raises(ckpt.CheckpointError, match=f"{os.path.join(last, name)}.*{reason}|{reason}") as e:
        ckpt.load_checkpoint(last, Net())
    assert name in str(e.value)
    path, skipped = ckpt.latest_valid_checkpoint(d)
    assert path == first
    assert len(skipped) == 1 and last in skipped[0] and name in skipped[0]
    with caplog.at_level("WARNING", logger="iwm_fast"):
        assert ckpt.latest_checkpoint(d) == first
    assert last in caplog.text and "falling back" in caplog.text
    assert ckpt.load_checkpoint(first, Net())["step"] == 1


def test_no_checkpoint_verifies(tmp_path):
    d, paths, _ = _saved(tmp_path)
    for p in paths:
        _flip(os.path.join(p, "__0_0.distcp"), 100)
    path, skipped = ckpt.latest_valid_checkpoint(d)
    assert path is None and len(skipped) == 2
    assert ckpt.latest_checkpoint(d, verify=False) == paths[-1]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    d, (first, last), model = _saved(tmp_path)
    opt = torch.optim.AdamW(model.parameters())
    monkeypatch.setattr(fs, "_write_item", _enospc)  # DCP's shard writes hit a full disk
    with pytest.raises(ckpt.DiskFullError, match=r"disk full: saving checkpoint step_00000003 in .*checkpoints "
                       r"needs about [0-9.]+ [KMG]?B .*free there; the last good checkpoint .*step_00000002 is kept"):
        ckpt.save_checkpoint(d, 3, model, opt, {})
    assert sorted(os.listdir(d)) == ["step_00000001", "step_00000002"]  # no half-written folder left
    assert ckpt.latest_checkpoint(d) == last


def test_a_full_disk_reported_without_errno_is_recognised_by_the_free_space(tmp_path, monkeypatch):
    # torch.save's zip writer says "unexpected pos 704 vs 598" when the disk fills up, without the errno.
    d, _, model = _saved(tmp_path)

    def zip_writer_fails(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.torch, "save", zip_writer_fails)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: _Usage(100))
    with pytest.raises(ckpt.DiskFullError, match="needs about .*, 100 B free there"):
        ckpt.save_checkpoint(d, 3, model, torch.optim.AdamW(model.parameters()), {})
    assert ckpt.latest_checkpoint(d).endswith("step_00000002")


class _Usage:
    def __init__(self, free):
        self.free = free


def test_other_save_failures_name_the_folder(tmp_path, monkeypatch):
    d, _, model = _saved(tmp_path)
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(ckpt.CheckpointError, match=r"saving checkpoint step_00000003 in .* failed .*denied"):
        ckpt.save_checkpoint(d, 3, model, torch.optim.AdamW(model.parameters()), {})


def test_rotation_keeps_checkpoints_past_the_step_being_saved(tmp_path):
    # A run resumed past a damaged step 4 saves step 3: rotation counts only the checkpoints up to step 3, so
    # the damaged one cannot push the good ones out (it is replaced when the run reaches step 4 again).
    d, _, model = _saved(tmp_path, steps=(1, 2, 4))
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(d, 3, model, opt, {}, keep=2)
    assert [os.path.basename(p) for p in ckpt.complete_checkpoints(d)] == [
        "step_00000002", "step_00000003", "step_00000004"]


def test_export_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "target_encoder.pt")
    monkeypatch.setattr(ckpt.torch, "save", _enospc)
    with pytest.raises(ckpt.DiskFullError, match="disk full: writing .*target_encoder.pt"):
        ckpt.export_target_encoder({"target_encoder.w": torch.ones(3)}, path)
    assert os.listdir(tmp_path) == []
