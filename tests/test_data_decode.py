"""The one-pass decode + crop (same crops as the tensor path, scaled-DCT quality), 16-bit images, pixel limits,
and ImageFolder's handling of directory links."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from iwm_fast.data import ImageFolder, SkippedLinkWarning, UnreadableImageWarning, decode_image
from iwm_fast.data.decode import decode_center_crop, decode_random_crop, draft_factor
from iwm_fast.transforms.geometry import center_crop_resize, random_resized_crop_flip
from iwm_fast.transforms.seeding import generator


def _photo():
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg")  # a real 427 x 640 photo


@pytest.fixture(scope="module")
def photo_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "china_small.jpg"
    Image.fromarray(_photo()).resize((200, 150), Image.BICUBIC).save(path, quality=90)
    return str(path)


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory):
    # A 1280 x 854 photo with the original's full detail (mirrored tiles, not an upscale, which would be smooth).
    a = _photo()
    big = np.concatenate([np.concatenate([a, a[:, ::-1]], 1), np.concatenate([a[::-1], a[::-1, ::-1]], 1)], 0)
    path = tmp_path_factory.mktemp("photo") / "china_large.jpg"
    Image.fromarray(big).save(path, quality=90)
    return str(path)


@pytest.mark.parametrize("size", [24, (20, 28)])
def test_one_pass_crop_matches_the_tensor_path(photo_jpeg, size):
    # Same box and flip from the same (seed, epoch, index) key, same triangle filter: within one grey level.
    full = decode_image(photo_jpeg)
    flips = set()
    for key in range(12):
        ref = random_resized_crop_flip(full, size, scale=(0.3, 1.0), generator=generator(7, 1, key))
        ours = decode_random_crop(photo_jpeg, size, scale=(0.3, 1.0), generator=generator(7, 1, key), draft=False)
        assert ours.shape == ref.shape and ours.dtype == torch.uint8 and ours.is_contiguous()
        assert (ours.int() - ref.int()).abs().max() <= 1
        unflipped = random_resized_crop_flip(full, size, scale=(0.3, 1.0), generator=generator(7, 1, key), flip_p=0)
        flips.add(not torch.equal(ref, unflipped))
    assert flips == {True, False}  # both flipped and unflipped crops occurred (else the flip test proves nothing)
    ev = decode_center_crop(photo_jpeg, size, draft=False)
    assert (ev.int() - center_crop_resize(full, size).int()).abs().max() <= 1


def test_draft_factor():
    assert draft_factor(447, 900, 224, 224) == 1       # never below the output size
    assert draft_factor(448, 448, 224, 224) == 2
    assert draft_factor(1800, 1800, 224, 224) == 8
    assert draft_factor(5000, 5000, 224, 224) == 8     # JPEG scales down by 8 at most


def test_scaled_dct_decode_quality(large_jpeg):
    """Decoding at 1/2 or 1/4 scale when the crop allows stays close to the full decode: PSNR >= 30 dB.

    (Measured over 16 crops at 224 px: 31-41 dB on this photo, 36-48 dB on flower.jpg. The scaled IDCT
    averages like a box filter before the antialiased bilinear resize, and the crop box is rounded to the
    reduced grid, a shift of at most half a reduced pixel; a wrongly scaled box would give about 15 dB.)
    """
    used = 0
    for key in range(8):
        g = dict(scale=(0.3, 1.0), generator=None)
        a = decode_random_crop(large_jpeg, 224, **{**g, "generator": generator(0, 0, key)}, draft=True)
        b = decode_random_crop(large_jpeg, 224, **{**g, "generator": generator(0, 0, key)}, draft=False)
        mse = (a.double() - b.double()).pow(2).mean().item()
        psnr = 10 * math.log10(255 ** 2 / max(mse, 1e-12))
        assert psnr >= 30, (key, psnr)
        used += mse > 0
    assert used >= 6  # the scaled decode was really taken for most crops of this 1280 x 854 photo
    c = decode_center_crop(large_jpeg, 224)
    assert 10 * math.log10(255 ** 2 / (c.double() - decode_center_crop(large_jpeg, 224, draft=False).double())
                           .pow(2).mean().item()) >= 30


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    # A 16-bit grey PNG opens as I;16 (older PIL: I); PNG cannot store mode I, so that case is a TIFF.
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    im = Image.fromarray(ramp) if mode == "I;16" else Image.fromarray(ramp.astype(np.int32), "I")
    im.save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")
    img = decode_image(str(path))
    assert img.shape == (3, 16, 64)
    expect = torch.from_numpy(np.rint(ramp / 257.0).astype(np.int64))
    assert (img[0].long() - expect).abs().max() <= 1 and torch.equal(img[0], img[2])
    assert (img == 255).float().mean() < 0.05  # before the fix: 99.7 % white
    crop = decode_random_crop(str(path), 8, scale=(0.5, 1.0), generator=generator(0))
    assert crop.float().std() > 20  # the crop sees the ramp, not a white sheet


def test_pixel_limit_skips_decompression_bombs(tmp_path):
    # 4000 x 4000 one-bit PNG: a few KB on disk, 48 MB as RGB. The limit is read from the header.
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    Image.new("1", (4000, 4000)).save(root / "a" / "bomb.png")
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(root / "a" / "fine.png")
    assert os.path.getsize(root / "a" / "bomb.png") < 10_000
    ds = ImageFolder(root, image_size=8, max_image_pixels=1_000_000)
    bomb = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("bomb.png"))
    with pytest.warns(UnreadableImageWarning, match="bomb.png.*16.0 megapixels is over data.max_image_pixels"):
        assert ds[bomb] is None
    assert ds[1 - bomb] is not None
    with pytest.warns(UnreadableImageWarning, match="megapixels"):
        assert decode_image(str(root / "a" / "bomb.png"), max_pixels=1_000_000) is None
    assert decode_image(str(root / "a" / "bomb.png"), max_pixels=0).shape == (3, 4000, 4000)  # 0: no limit
    with pytest.raises(ValueError, match="max_image_pixels"):
        ImageFolder(root, image_size=8, max_image_pixels=-1)


def _folder_with_link(tmp_path, links):
    root = tmp_path / "data"
    for cls in ("class0", "class1"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((10, 10, 3), 40 * k, np.uint8)).save(root / cls / f"{k}.png")
    for where, target in links:
        os.symlink(target, root / where)
    return root


@pytest.mark.parametrize("links, n_warn", [
    ([("class0/a", "."), ("class0/b", ".")], 2),   # hung before the fix
    ([("class0/self", ".")], 1),                    # multiplied class 0 by 41
    ([("class1/up", "..")], 1),                     # labelled class 0's images as class 1
])
def test_directory_link_loops(tmp_path, links, n_warn):
    root = _folder_with_link(tmp_path, links)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(root, image_size=8)
    skipped = [w for w in caught if issubclass(w.category, SkippedLinkWarning)]
    assert len(skipped) == n_warn and "not following directory link" in str(skipped[0].message)
    assert len(ds) == 6
    assert sorted((os.path.basename(os.path.dirname(p)), label) for p, label in ds.samples) == \
        [("class0", 0)] * 3 + [("class1", 1)] * 3


def test_links_inside_the_class_and_out_of_the_root(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(outside / "x.png")
    root = _folder_with_link(tmp_path, [("class1/out", str(outside))])
    (root / "class0" / "sub").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "class0" / "sub" / "y.png")
    os.symlink("sub", root / "class0" / "alias")  # the same directory twice: read once
    with pytest.warns(SkippedLinkWarning, match="out of the data root"):
        ds = ImageFolder(root, image_size=8)
    assert len(ds) == 7 and sum(label == 0 for _, label in ds.samples) == 4


def test_sample_order_is_os_walks(tmp_path):
    # Sample indices key the crops and the sampler's permutation: the link-safe walk keeps the old order.
    root = tmp_path / "data"
    for rel in ["c/a.png", "c/b/x.png", "c/c.png", "c/b/y/z.png", "c/B.png", "c/.hidden/h.png", "d/q.png",
                "d/aa/r.png", "d/.skip.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / rel)
    old = []
    for label, name in enumerate(["c", "d"]):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            old += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if not f.startswith(".")]
    assert ImageFolder(root, 4).samples == old
