"""bench_data: the input pipeline on real photos, per CPU core and through the full loader.

Photos: the JPEGs that installed packages ship (scikit-learn's china.jpg and flower.jpg, matplotlib's
grace_hopper.jpg), cut at random places and scales into ImageNet-like 500 x 375 JPEGs of quality 90 (about
50 KB) in a temporary folder. Output: random resized crop (scale 0.3-1.0, aspect 3/4-4/3) and flip, 224 px.

Per core (this process, torch threads 1), medians over rounds that take the providers in turn:

- ``ours``: ``ImageFolder.__getitem__`` (header, box, scaled decode when the crop allows, crop, uint8 resize);
- ``today``: the previous ``__getitem__``: PIL full decode to a tensor, then the float crop and resize;
- ``ijepa``: I-JEPA's pipeline, PIL decode + a torchvision-style RandomResizedCrop (PIL bilinear on the crop
  box) and RandomHorizontalFlip, ending in a uint8 tensor (its ToTensor's float division left out: ours defers
  it to the device too). Written here, as torchvision is not installed beside the pinned torch;
- ``pil_decode``: PIL's full decode alone, the floor of the first two.

Full loader: ``build_loader`` over the photos with 0, 1, 2, 4, ... workers and one per core, batches of 16;
batches/s and images/s. Data wait: a short ``iwm-train`` run on the photos (224 px; on the CPU ViT-tiny with
2 blocks and batch 8, on CUDA ViT-B/16 and batch 64), the median of metrics.csv's ``data_wait_frac`` over
the steps after the first (``--no-engine`` skips it).
"""
import glob
import math
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from . import harness

NOTES = []
ROWS_SO_FAR = []
OUT = 224
SCALE, RATIO = (0.3, 1.0), (3 / 4, 4 / 3)


def source_photos():
    """Paths of real photos shipped by installed packages."""
    found = []
    try:
        import sklearn.datasets

        found += sorted(glob.glob(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "*.jpg")))
    except ImportError:
        pass
    try:
        import matplotlib

        found += sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "sample_data", "*.jpg")))
    except ImportError:
        pass
    if not found:
        raise RuntimeError("no installed package ships JPEG photos (scikit-learn or matplotlib sample data)")
    return found


def make_photos(out_dir, n, size=(500, 375), quality=90, seed=0, classes=2):
    """``n`` ImageNet-like JPEGs cut from the shipped photos into ``out_dir/<class>/``; returns their paths."""
    from PIL import Image

    sources = [Image.open(p).convert("RGB") for p in source_photos()]
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        im = sources[k % len(sources)]
        W, H = im.size
        s = rng.uniform(0.6, 1.0)
        cw = min(W, H * size[0] / size[1]) * s
        ch = cw * size[1] / size[0]
        left, top = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
        crop = im.resize(size, Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if k % 2:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        d = os.path.join(out_dir, f"class{k % classes}")
        os.makedirs(d, exist_ok=True)
        paths.append(os.path.join(d, f"{k:05d}.jpg"))
        crop.save(paths[-1], quality=quality)
    return paths


def _ijepa_params(W, H, rng):
    # torchvision's RandomResizedCrop.get_params, written out: 10 tries, then the clamped centre crop.
    area = W * H
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    in_ratio = W / H
    if in_ratio < RATIO[0]:
        w, h = W, int(round(W / RATIO[0]))
    elif in_ratio > RATIO[1]:
        h, w = H, int(round(H * RATIO[1]))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def ijepa_item(path, rng):
    from PIL import Image

    with Image.open(path) as im:
        img = im.convert("RGB")
    top, left, h, w = _ijepa_params(img.size[0], img.size[1], rng)
    img = img.resize((OUT, OUT), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def today_item(path, key, seed=0):
    # The ImageFolder.__getitem__ before the one-pass path, line for line: full decode, a CHW copy, float resize.
    from PIL import Image

    from ..transforms.geometry import random_resized_crop_flip
    from ..transforms.seeding import generator

    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"), dtype=np.uint8)
    img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return random_resized_crop_flip(img, OUT, scale=SCALE, generator=generator(seed, 0, key))


def pil_decode(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def per_core(paths, rounds):
    """{provider: [images/s per round]}, the providers taken in turn within each round."""
    from ..data import ImageFolder

    root = os.path.dirname(os.path.dirname(paths[0]))
    ds = ImageFolder(root, image_size=OUT, crop=True, seed=0, crop_scale=SCALE)
    n = len(ds)
    rng = random.Random(0)
    providers = {"ours": lambda: [ds[i] for i in range(n)],
                 "today": lambda: [today_item(ds.samples[i][0], i) for i in range(n)],
                 "ijepa": lambda: [ijepa_item(ds.samples[i][0], rng) for i in range(n)],
                 "pil_decode": lambda: [pil_decode(ds.samples[i][0]) for i in range(n)]}
    for fn in providers.values():  # warm: file cache, imports, first-call costs
        fn()
    rates = {k: [] for k in providers}
    for _ in range(rounds):
        for k, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            rates[k].append(n / (time.perf_counter() - t0))
    return rates


def loader_rate(root, workers, batch, batches):
    """(batches/s, images/s) of the training loader with ``workers`` workers, after two warm batches."""
    from ..data import ImageFolder, build_loader

    ds = ImageFolder(root, image_size=OUT, crop=True, seed=0, crop_scale=SCALE)
    loader, _ = build_loader(ds, batch, num_workers=workers, seed=0, pin_memory=False)

    def forever(epochs):
        while True:
            yield from epochs

    it = forever(loader)
    for _ in range(2):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    del loader  # its persistent workers end with it
    return batches / dt, batches * batch / dt


def engine_data_wait(root, device, workers, steps, out_dir):
    """(median, min, max) of ``data_wait_frac`` and the median step time of a short training run on the photos,
    over the steps after the first. CPU: ViT-tiny with 2 blocks, batch 8; CUDA: ViT-B/16, batch 64."""
    import csv

    from ..config import load_config
    from ..train.loop import train

    if torch.device(device).type == "cuda":
        model = ["model.size=base", "train.batch_size=64", "train.device=cuda"]
    else:
        model = ["model.size=tiny", "model.depth=2", "predictor.depth=1", "predictor.width=96",
                 "train.batch_size=8", "train.device=cpu"]
    cfg = load_config(None, model + [
        "data.dataset=imagefolder", f"data.root={root}", f"data.image_size={OUT}", f"data.num_workers={workers}",
        f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=1000", "eval.enabled=false",
        f"train.out_dir={out_dir}"])
    run_dir = train(cfg)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    waits = [float(r["data_wait_frac"]) for r in rows[1:]]
    steps_s = [float(r["step_time_s"]) for r in rows[1:]]
    return statistics.median(waits), min(waits), max(waits), statistics.median(steps_s)


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _stats(xs):
    s = sorted(xs)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return statistics.median(s), q(0.2), q(0.8)


def run(device, quick, engine=True):
    meta = harness.metadata(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = ROWS_SO_FAR
    rows.clear()
    NOTES.clear()
    n_photos, rounds = (48, 5) if quick else (160, 9)
    shape = f"{n_photos}x500x375q90->{OUT}"
    try:
        with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
            photos = make_photos(os.path.join(tmp, "photos"), n_photos)
            kb = sum(os.path.getsize(p) for p in photos) / len(photos) / 1024
            names = ", ".join(os.path.basename(p) for p in source_photos())
            NOTES.append(f"{len(photos)} photos of {kb:.0f} KB mean from {names}")
            rates = per_core(photos, rounds)
            for prov, r in rates.items():
                rows.append(harness.row("data", prov, shape, "uint8", "images_per_s_per_core", _stats(r), meta))
            for base in ("today", "ijepa"):
                ratio = [a / b for a, b in zip(rates["ours"], rates[base])]  # paired within each round
                rows.append(harness.row("data", "ours", shape, "uint8", f"speedup_vs_{base}", _stats(ratio), meta))
            root = os.path.join(tmp, "photos")
            ncores = cores()
            counts = {0, 1, ncores} | ({2 ** k for k in range(1, 6) if 2 ** k < ncores} if not quick else set())
            for workers in sorted(counts):
                bps, ips = loader_rate(root, workers, 16, 4 if quick else 12)
                lshape = f"loader:workers={workers},cores={ncores},batch=16"
                rows.append(harness.row("data", "ours", lshape, "uint8", "batches_per_s", (bps,) * 3, meta))
                rows.append(harness.row("data", "ours", lshape, "uint8", "images_per_s", (ips,) * 3, meta))
            if engine:
                cuda = torch.device(device).type == "cuda"
                workers = max(1, min(ncores - 1, 8))
                steps = (6 if quick else 16) if cuda else (4 if quick else 8)
                med, lo, hi, step_s = engine_data_wait(root, device, workers, steps, os.path.join(tmp, "run"))
                what = "vit-b16,batch=64" if cuda else "vit-tiny-2blocks,batch=8"
                eshape = f"engine:{what},workers={workers},cores={ncores}"
                rows.append(harness.row("data", "ours", eshape, "uint8", "data_wait_frac", (med, lo, hi), meta))
                rows.append(harness.row("data", "ours", eshape, "uint8", "step_time_s", (step_s,) * 3, meta))
    finally:
        torch.set_num_threads(threads)
    return list(rows)


def main(argv=None):
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    engine = "--no-engine" not in argv
    rows = harness.bench_main(lambda d, q: run(d, q, engine=engine), __doc__.splitlines()[0],
                              [a for a in argv if a != "--no-engine"])
    for n in NOTES:
        print(n)
    return rows


if __name__ == "__main__":
    main()
