"""``iwm-make-shards SRC_IMAGEFOLDER OUT_DIR --shard-size N``: an ImageFolder as WebDataset-style tar shards.

Files are stored as they are (no re-encoding), in a seeded shuffled order so that every shard mixes the
classes, each as ``<number>.<ext>`` beside ``<number>.cls`` (the label, the class folder's sorted position).
``OUT_DIR/classes.txt`` lists the class names in label order. Each shard is written under a temporary name
and renamed when complete, so an interrupted conversion leaves no partial shard under a shard's name.
"""
import argparse
import io
import os
import sys
import tarfile
import warnings

import torch


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(src, out_dir, shard_size, *, seed=0, shuffle=True, progress=True):
    """Convert ``src`` (an ImageFolder tree) into ``out_dir/shard-NNNNNN.tar``; returns the shard paths."""
    from tqdm import tqdm

    from .folder import ImageFolder

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        folder = ImageFolder(src, image_size=1)  # lists the files only; nothing is decoded
    n = len(folder.samples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else range(n)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in folder.classes))
    paths, tar, tmp = [], None, None
    digits = max(6, len(str(n)))
    try:
        for j, i in enumerate(tqdm(order, total=n, unit="img", desc="iwm-make-shards", disable=not progress)):
            if j % shard_size == 0:
                if tar is not None:
                    tar.close()
                    os.replace(tmp, paths[-1])
                paths.append(os.path.join(out_dir, f"shard-{j // shard_size:06d}.tar"))
                tmp = paths[-1] + ".partial"
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            path, label = folder.samples[i]
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            with open(path, "rb") as f:
                data = f.read()
            key = f"{j:0{digits}d}"
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.cls", str(label).encode())
        if tar is not None:
            tar.close()
            os.replace(tmp, paths[-1])
            tar = None
    finally:
        if tar is not None:
            tar.close()
            os.remove(tmp)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(prog="iwm-make-shards", description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("src", help="an ImageFolder: SRC/<class>/**/*.{jpg,jpeg,png}")
    p.add_argument("out_dir", help="folder for the shards (created; must not hold .tar files yet)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled file order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the folder's order (class after class)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {a.shard_size}")
    if not os.path.isdir(a.src):
        p.error(f"SRC_IMAGEFOLDER {a.src!r} is not a directory")
    if os.path.isdir(a.out_dir) and any(f.endswith(".tar") for f in os.listdir(a.out_dir)):
        p.error(f"OUT_DIR {a.out_dir!r} already holds .tar shards; give an empty or new folder")
    if os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir):
        p.error(f"OUT_DIR {a.out_dir!r} exists and is not a directory")
    try:
        paths = write_shards(a.src, a.out_dir, a.shard_size, seed=a.seed, shuffle=not a.no_shuffle,
                             progress=not a.no_progress)
    except (ValueError, OSError) as err:  # an empty or unreadable source folder
        print(f"iwm-make-shards: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} shards to {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
