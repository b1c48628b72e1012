"""bench_data's photo set and baselines (the timing itself is the benchmark's business, not a test's)."""
import math
import random

from PIL import Image

from iwm_fast.bench import data as bench_data
from iwm_fast.data import ImageFolder


def test_photo_set_and_the_pipelines_it_compares(tmp_path):
    paths = bench_data.make_photos(str(tmp_path / "p"), 4)
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (500, 375) and im.format == "JPEG"
    ds = ImageFolder(str(tmp_path / "p"), image_size=224)
    for i, (path, _) in enumerate(ds.samples):
        ours, _, _ = ds[i]
        today = bench_data.today_item(path, i)   # the previous __getitem__: same crop, same filter
        assert ours.shape == today.shape == (3, 224, 224)
        assert (ours.int() - today.int()).abs().max() <= 1
    rng = random.Random(0)
    assert bench_data.ijepa_item(paths[0], rng).shape == (3, 224, 224)


def test_ijepa_crop_parameters_follow_torchvision():
    rng = random.Random(1)
    for _ in range(300):
        top, left, h, w = bench_data._ijepa_params(500, 375, rng)
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
        assert 0.3 - 0.02 <= h * w / (500 * 375) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # No admissible box in 10 tries (a 100:1 strip): the centred crop clamped to the aspect range.
    assert bench_data._ijepa_params(1000, 10, random.Random(0)) == (0, (1000 - round(10 * 4 / 3)) // 2, 10,
                                                                      round(10 * 4 / 3))
    assert math.isclose(bench_data.SCALE[0], 0.3)
