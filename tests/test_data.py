"""Bundled digits, ImageFolder with unreadable files, the resumable distributed sampler and loader."""
import signal
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from iwm_fast.data import (BundledDigits, ImageFolder, ResumableSampler, UnreadableImageWarning, build_loader,
                           collate_skip_bad)


@pytest.fixture(scope="module")
def digits_val():
    return BundledDigits("val", image_size=16, crop=True, seed=3)


# ----- bundled digits -----

def test_bundled_digits_split_shapes_labels():
    from sklearn.datasets import load_digits

    target = load_digits().target
    tr, va = BundledDigits("train", image_size=16, crop=False), BundledDigits("val", image_size=16, crop=False)
    assert len(tr) + len(va) == 1797
    assert not set(tr.source_indices.tolist()) & set(va.source_indices.tolist())
    for ds in (tr, va):
        assert torch.equal(ds.labels, torch.as_tensor(target[ds.source_indices]))
        counts = torch.bincount(ds.labels, minlength=10)
        assert counts.min() > 0 and counts.sum() == len(ds)
        img, label, index = ds[5]
        assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == int(ds.labels[5]) and index == 5
    # Stratified: every class gets about a sixth of its images in val.
    frac = torch.bincount(va.labels, minlength=10) / torch.bincount(torch.as_tensor(target), minlength=10)
    assert frac.min() > 0.15 and frac.max() < 0.19
    # Colourised: the three channels differ (foreground and background hues are far apart).
    im = tr.images.float()
    assert (im[:, 0] - im[:, 1]).abs().mean(dim=(1, 2)).gt(5).float().mean() > 0.9


def test_bundled_digits_deterministic_crops(digits_val):
    again = BundledDigits("val", image_size=16, crop=True, seed=3)
    assert torch.equal(again.images, digits_val.images)
    a, b = digits_val[(2, 7)][0], again[(2, 7)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, digits_val[(3, 7)][0])                 # another epoch, another crop
    assert not torch.equal(a, BundledDigits("val", image_size=16, seed=4)[(2, 7)][0])
    assert torch.equal(BundledDigits("val", image_size=16, crop=False)[7][0], digits_val.images[7])
    with pytest.raises(ValueError, match="split"):
        BundledDigits("test")
    with pytest.raises(IndexError):
        digits_val[len(digits_val)]


# ----- ImageFolder -----

def _write_folder(root):
    rng = np.random.default_rng(0)
    files = {"cat": [], "dog": []}
    for k in range(3):
        for cls, fmt in (("cat", "PNG"), ("dog", "JPEG")):
            d = root / cls / ("nested" if k == 2 else "")
            d.mkdir(parents=True, exist_ok=True)
            arr = rng.integers(0, 256, size=(20 + 7 * k, 30 - 3 * k, 3), dtype=np.uint8)
            path = d / f"img{k}.{'png' if fmt == 'PNG' else 'jpg'}"
            Image.fromarray(arr).save(path, fmt)
            files[cls].append(path)
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(root / "cat" / "gray.png")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    good_jpeg = files["dog"][0].read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_skips_and_counts_corrupt_files(tmp_path):
    root = _write_folder(tmp_path / "data")
    ds = ImageFolder(root, image_size=12, crop=True, seed=1)
    assert ds.classes == ("cat", "dog") and len(ds) == 9   # 4 cat (one broken), 5 dog (one truncated)
    bad = {i for i, (p, _) in enumerate(ds.samples) if "broken" in p or "truncated" in p}
    assert len(bad) == 2
    with pytest.warns(UnreadableImageWarning, match="broken.png"):
        assert ds[min(bad)] is None or ds[max(bad)] is None
    loader, sampler = build_loader(ds, 3, num_workers=2, seed=0)
    seen, skipped, labels = 0, 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        for batch in loader:
            assert batch["images"].dtype == torch.uint8 and batch["images"].shape[1:] == (3, 12, 12)
            assert batch["images"].shape[0] + batch["num_skipped"] == 3
            assert batch["batch_positions"].tolist() == sorted(batch["batch_positions"].tolist())
            seen += batch["images"].shape[0]
            skipped += batch["num_skipped"]
            labels += batch["labels"].tolist()
            assert not set(batch["indices"].tolist()) & bad
    assert (seen, skipped) == (7, 2)
    assert sorted(labels) == [0, 0, 0, 0, 1, 1, 1]
    assert sampler.state_dict()["epoch"] == 1  # the epoch was consumed to the end


def test_image_folder_eval_view_and_errors(tmp_path):
    root = _write_folder(tmp_path / "data")
    ds = ImageFolder(root, image_size=8, crop=False)
    gray = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("gray.png"))
    img, label, _ = ds[gray]
    assert img.shape == (3, 8, 8) and label == 0
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])   # an "L" PNG becomes 3 equal channels
    assert torch.equal(ds[gray][0], img)                                  # the eval view is not random
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(tmp_path / "empty", 8)
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(tmp_path / "empty", 8)


def test_collate_all_bad_batch():
    b = collate_skip_bad([None, None], image_size=8)
    assert b["images"].shape == (0, 3, 8, 8) and b["num_skipped"] == 2 and b["labels"].numel() == 0


# ----- sampler and resume -----

@pytest.mark.parametrize("n, world", [(50, 3), (37, 4), (10, 1)])
def test_sampler_ranks_disjoint_and_strided(n, world):
    samplers = [ResumableSampler(n, rank=r, world_size=world, seed=5) for r in range(world)]
    parts = [list(s) for s in samplers]
    assert all(len(p) == n // world == len(s) for p, s in zip(parts, samplers))
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))
    # Micro-batches of all ranks together are the one-process global batch.
    single = list(ResumableSampler(n, seed=5))
    b = 2
    for k in range(len(parts[0]) // b):
        union = sorted(i for p in parts for i in p[k * b:(k + 1) * b])
        assert union == sorted(single[k * b * world:(k + 1) * b * world])
    s = samplers[0]
    s.set_epoch(1)
    assert list(s) != parts[0]   # each epoch has its own permutation
    assert list(ResumableSampler(n, seed=5, shuffle=False)) == list(range(n))


def test_sampler_state_errors():
    s = ResumableSampler(20, world_size=2, rank=1, seed=0)
    with pytest.raises(ValueError, match="do not split over 2 ranks"):  # 3 of 5 samples each on 3 ranks: 9
        s.load_state_dict(ResumableSampler(20, world_size=3, seed=0).state_dict() | {"position": 3,
                                                                                      "samples_seen": 9})
    with pytest.raises(ValueError, match="without drop_last it resumes on 4 ranks only"):
        ResumableSampler(20, world_size=2, drop_last=False).load_state_dict(
            {"epoch": 0, "position": 2, "world_size": 4, "drop_last": False})
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "position": 3, "seed": 9})
    with pytest.raises(ValueError, match="out of range"):
        s.load_state_dict({"epoch": 0, "position": 11})
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(20, rank=2, world_size=2)
    s.load_state_dict({"epoch": 2, "position": 4})
    s.set_epoch(2)  # the same epoch keeps the restored position
    assert len(s) == 6


@pytest.mark.parametrize("n, before, after", [(50, 2, 1), (50, 1, 2), (61, 2, 4), (61, 4, 2)])
def test_a_position_resumes_on_another_number_of_ranks(n, before, after):
    """The k-th micro-batches of all ranks are the same slice of the epoch's permutation whatever the rank
    count: a state saved on ``before`` ranks resumes on ``after`` ranks with the same samples, in the same
    global order, to the end of the epoch (same global micro-batch of 4, so 4 // ranks each)."""
    def global_batches(world, states=None, skip=0):
        samplers = [ResumableSampler(n, rank=r, world_size=world, seed=7) for r in range(world)]
        for s in samplers:
            if states is not None:
                s.load_state_dict(states)
        parts = [list(s) for s in samplers]
        per = 4 // world
        steps = (n // world // per) - (samplers[0].position // per)
        return [sorted(i for p in parts for i in p[k * per:(k + 1) * per]) for k in range(steps)], samplers

    whole, _ = global_batches(before)
    first = 5
    _, samplers = global_batches(before)
    for s in samplers:
        s.advance(first * (4 // before))
    state = samplers[0].state_dict()
    assert state["samples_seen"] == first * 4
    rest, resumed = global_batches(after, states=state)
    assert resumed[0].position == first * 4 // after
    assert whole == whole[:first] + rest  # the same global batches, none lost or repeated


def test_loader_workers_ignore_job_signals(digits_val):
    """SIGTERM and SIGINT to the loader workers (a whole-job signal, in any order) leave them running, and
    close() stops them."""
    from process_tree import alive, epoch_with_signalled_workers

    loader, _ = build_loader(digits_val, 16, num_workers=2, seed=1)
    got, workers = epoch_with_signalled_workers(loader, 2, (signal.SIGINT, signal.SIGTERM))
    assert sum(len(b["indices"]) for b in got) == len(digits_val) // 16 * 16
    assert all(alive(p) for p in workers)  # persistent workers, alive after the signals and the epoch
    loader.close()
    assert not any(alive(p) for p in workers)


def _take(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.append((batch["indices"].clone(), batch["images"].clone()))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_mid_epoch(digits_val, num_workers):
    kw = dict(rank=1, world_size=2, seed=11, num_workers=num_workers)
    per_epoch = (len(digits_val) // 2) // 16   # 9 batches of 16 per rank per epoch
    loader, sampler = build_loader(digits_val, 16, **kw)
    reference = _take(loader, per_epoch + 4)   # into the next epoch
    loader, sampler = build_loader(digits_val, 16, **kw)
    first = _take(loader, 5)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 80)
    del loader
    resumed_loader, _ = build_loader(digits_val, 16, start_state=state, **kw)
    rest = _take(resumed_loader, per_epoch - 5 + 4)
    for (ia, xa), (ib, xb) in zip(reference, first + rest):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    # Next epoch reshuffles, and its crops differ from the same sample's crop in epoch 0.
    assert not torch.equal(reference[0][0], reference[per_epoch][0])


def test_unreadable_files_counted_once_over_epochs_and_ranks(tmp_path):
    # "N unreadable image files were skipped" summed num_skipped over draws: a bad file counted each epoch.
    root = _write_folder(tmp_path / "data")
    total, named = 0, set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        for rank in range(2):
            ds = ImageFolder(root, image_size=8, seed=1)
            bad = {i for i, (p, _) in enumerate(ds.samples) if "broken" in p or "truncated" in p}
            loader, sampler = build_loader(ds, 2, rank=rank, world_size=2, seed=3)
            for _ in range(4):  # epochs
                for batch in loader:
                    total += batch["num_skipped"]
                    if "skipped_indices" in batch:
                        named |= set(batch["skipped_indices"].tolist())
                        assert len(batch["skipped_indices"]) + len(batch["indices"]) == 2
    assert named == bad and total == len(bad) == 2  # the two bad files, each drawn several times, count once
