"""``iwm-make-shards SRC_IMAGEFOLDER OUT_DIR --shard-size N``: an ImageFolder as WebDataset-style tar shards.

Files are stored as they are (no re-encoding), in a seeded shuffled order so that every shard mixes the
classes, each as ``<place>.<ext>`` beside ``<place>.cls`` (the label, the class folder's sorted position),
``<place>`` being the file's place in that order. ``OUT_DIR/classes.txt`` lists the class names in label order.

Resumable: the plan (the settings and a digest of the ordered file list) goes to ``OUT_DIR/conversion.json``
first; shard k holds places k*N to (k+1)*N - 1 of the order, written under a temporary name and renamed when
complete. Rerunning the same command after a kill or a failure keeps the complete shards and writes the rest;
a rerun with other settings, or after the source folder changed, is refused. ``manifest.json`` is written
last (``iwm_fast.data.manifest``): training refuses a set without it.

A source file that cannot be read (permissions, an I/O error) is skipped rather than ending the conversion:
its place stays empty, ``manifest.json`` lists it under ``skipped`` with the reason, and the command ends with
a line counting them (exit status 0: the set is complete without them; training logs the count too). Images
are not decoded here: an undecodable one is skipped and counted by the training run.
"""
import argparse
import io
import json
import os
import sys
import tarfile
import warnings

import torch

from .manifest import FORMAT, MANIFEST, PLAN, ShardSetError, describe_shard, read_manifest, write_manifest
from .manifest import verify_checksums

SHARD_NAME = "shard-{:06d}.tar"
_PLAN_KEYS = ("format", "shard_size", "seed", "shuffle", "files", "files_xxh3_128", "classes")


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _plan(folder, order, src, shard_size, seed, shuffle):
    import xxhash

    listing = "".join(f"{os.path.relpath(folder.samples[i][0], src)}\t{folder.samples[i][1]}\n" for i in order)
    return {"format": FORMAT, "src": os.path.realpath(src), "shard_size": shard_size, "seed": seed,
            "shuffle": shuffle, "files": len(order), "files_xxh3_128": xxhash.xxh3_128(listing.encode()).hexdigest(),
            "classes": list(folder.classes)}


def _differences(old, new):
    return [f"{k}: {old.get(k)!r} then, {new[k]!r} now" if k != "files_xxh3_128" else "the source files differ"
            for k in _PLAN_KEYS if old.get(k) != new[k]]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ShardSetError(f"{path} is unreadable ({err}); give an empty or new OUT_DIR") from None


def _prepare(out_dir, plan, names):
    """"fresh", "resume" or "complete" for ``out_dir`` under ``plan``; a ShardSetError where it holds other work."""
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        old = read_manifest(out_dir).get("plan") or {}
        diffs = _differences(old, plan)
        if diffs:
            raise ShardSetError(f"OUT_DIR {out_dir} already holds a complete shard set made otherwise "
                                f"({'; '.join(diffs)}); give an empty or new folder")
        return "complete"
    tars = sorted(n for n in os.listdir(out_dir) if n.endswith(".tar"))
    if os.path.exists(os.path.join(out_dir, PLAN)):
        diffs = _differences(_read_json(os.path.join(out_dir, PLAN)), plan)
        if diffs:
            raise ShardSetError(f"OUT_DIR {out_dir} holds an unfinished conversion with other settings or source "
                                f"files ({'; '.join(diffs)}); rerun it as it was, or give an empty or new folder")
        foreign = [n for n in tars if n not in names]
        if foreign:
            raise ShardSetError(f"OUT_DIR {out_dir} holds {foreign[0]}, which this conversion does not write")
        return "resume"
    if tars:
        raise ShardSetError(f"OUT_DIR {out_dir} already holds .tar shards not written by an unfinished "
                            "iwm-make-shards; give an empty or new folder")
    return "fresh"


def _write_json(path, body):
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, path)


def _write_shard(path, places, folder, order, digits, bar):
    """Write the files at ``places`` of the order into ``path``; returns ``{place: reason}`` of unreadable ones."""
    skipped, tmp = {}, path + ".partial"
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for j in places:
                    src, label = folder.samples[order[j]]
                    try:
                        with open(src, "rb") as g:
                            data = g.read()
                    except OSError as err:
                        skipped[j] = f"{type(err).__name__}: {err.strerror or err}"
                    else:
                        key = f"{j:0{digits}d}"
                        _add(tar, f"{key}{os.path.splitext(src)[1].lower()}", data)
                        _add(tar, f"{key}.cls", str(label).encode())
                    bar.update(1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return skipped


def write_shards(src, out_dir, shard_size, *, seed=0, shuffle=True, progress=True):
    """Convert ``src`` (an ImageFolder tree) into ``out_dir/shard-NNNNNN.tar`` and ``manifest.json``, resuming
    an unfinished conversion into the same folder; returns the manifest (a dict)."""
    return convert(src, out_dir, shard_size, seed=seed, shuffle=shuffle, progress=progress)[1]


def convert(src, out_dir, shard_size, *, seed=0, shuffle=True, progress=True):
    """``write_shards``, returning ``(state, manifest)``: state "fresh", "resume" or "complete" (nothing to do)."""
    from tqdm import tqdm

    from .folder import ImageFolder

    if _inside(os.path.realpath(out_dir), os.path.realpath(src)):
        raise ShardSetError(f"OUT_DIR {out_dir} is inside or equal to SRC_IMAGEFOLDER {src} (it would be read as "
                            "a class of its own); put the shards elsewhere")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        folder = ImageFolder(src, image_size=1)  # lists the files only; nothing is decoded
    n = len(folder.samples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    plan = _plan(folder, order, src, shard_size, seed, shuffle)
    count = -(-n // shard_size)
    names = [SHARD_NAME.format(k) for k in range(count)]
    os.makedirs(out_dir, exist_ok=True)
    state = _prepare(out_dir, plan, names)
    if state == "complete":
        return state, read_manifest(out_dir)
    if state == "fresh":
        _write_json(os.path.join(out_dir, PLAN), plan)
    for name in os.listdir(out_dir):
        if name.endswith(".partial"):
            os.remove(os.path.join(out_dir, name))  # cut short by a kill
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in folder.classes))
    digits = max(6, len(str(n)))
    done = [os.path.exists(os.path.join(out_dir, name)) for name in names]
    skipped = {}
    with tqdm(total=n, initial=sum(min(n, (k + 1) * shard_size) - k * shard_size for k in range(count) if done[k]),
              unit="img", desc="iwm-make-shards", disable=not progress) as bar:
        for k, name in enumerate(names):
            if not done[k]:
                places = range(k * shard_size, min(n, (k + 1) * shard_size))
                skipped.update(_write_shard(os.path.join(out_dir, name), places, folder, order, digits, bar))
    return state, _finish(out_dir, names, plan, folder, order, digits, skipped)


def _finish(out_dir, names, plan, folder, order, digits, skipped):
    """Describe every shard (re-read: what is on disk is what the manifest records) and write the manifest."""
    records, missing = [], []
    for k, name in enumerate(names):
        record, keys = describe_shard(os.path.join(out_dir, name))
        records.append(record)
        lo, hi = k * plan["shard_size"], min(plan["files"], (k + 1) * plan["shard_size"])
        present = set(keys)
        missing += [j for j in range(lo, hi) if f"{j:0{digits}d}" not in present]
    src = plan["src"]
    skipped_list = [{"path": os.path.relpath(folder.samples[order[j]][0], src),
                     "reason": skipped.get(j, "unreadable (skipped before the conversion was resumed)")}
                    for j in missing]
    body = write_manifest(out_dir, records, classes=plan["classes"], skipped=skipped_list, plan=plan)
    os.remove(os.path.join(out_dir, PLAN))
    return body


def index_shards(folder):
    """Check the tars of ``folder`` (written by another tool) and write their manifest; returns it."""
    if os.path.exists(os.path.join(folder, MANIFEST)):
        raise ShardSetError(f"{folder} already has a {MANIFEST}; delete it first to index the folder again")
    if os.path.exists(os.path.join(folder, PLAN)):
        raise ShardSetError(f"{folder} holds an unfinished iwm-make-shards conversion; run that command again "
                            "to finish it")
    tars = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    if not tars:
        raise ShardSetError(f"{folder} holds no .tar shards")
    records = [describe_shard(os.path.join(folder, n))[0] for n in tars]
    classes_txt = os.path.join(folder, "classes.txt")
    classes = open(classes_txt).read().split("\n")[:-1] if os.path.isfile(classes_txt) else []
    return write_manifest(folder, records, classes=classes)


def _parser():
    p = argparse.ArgumentParser(prog="iwm-make-shards", description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("src", nargs="?", help="an ImageFolder: SRC/<class>/**/*.{jpg,jpeg,png}")
    p.add_argument("out_dir", nargs="?", help="folder for the shards (created; empty, or an unfinished "
                   "conversion of the same command to resume)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled file order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the folder's order (class after class)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--index", metavar="DIR", help="write the manifest of tar shards made by another tool")
    p.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest's checksums")
    return p


def _check_args(p, a):
    if a.index or a.verify:
        if a.src or a.out_dir or (a.index and a.verify):
            p.error("--index DIR and --verify DIR take no other folder")
        return
    if not a.src or not a.out_dir:
        p.error("give SRC_IMAGEFOLDER and OUT_DIR (or --index DIR, or --verify DIR)")
    if a.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {a.shard_size}")
    if not os.path.isdir(a.src):
        p.error(f"SRC_IMAGEFOLDER {a.src!r} is not a directory")
    if os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir):
        p.error(f"OUT_DIR {a.out_dir!r} exists and is not a directory")


def _report(out_dir, state, body):
    if state == "complete":
        print(f"{out_dir} already holds this shard set, complete ({len(body['shards'])} shards, {body['samples']} "
              "samples); nothing to do")
        return
    done = "finished the conversion:" if state == "resume" else "wrote"
    print(f"{done} {len(body['shards'])} shards ({body['samples']} samples) in {out_dir}")
    skipped = body.get("skipped") or []
    if skipped:
        first = skipped[0]
        print(f"iwm-make-shards: warning: skipped {len(skipped)} unreadable source file(s), listed in "
              f"{os.path.join(out_dir, MANIFEST)} (first: {first['path']}: {first['reason']})", file=sys.stderr)


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    _check_args(p, a)
    try:
        if a.verify:
            problems = verify_checksums(a.verify)
            for line in problems:
                print(line)
            print(f"{a.verify}: {'every shard verifies' if not problems else f'{len(problems)} shard(s) differ'}")
            return 1 if problems else 0
        if a.index:
            body = index_shards(a.index)
            print(f"indexed {len(body['shards'])} shards ({body['samples']} samples, {body['unlabelled']} without "
                  f"a .cls label) in {a.index}")
            return 0
        state, body = convert(a.src, a.out_dir, a.shard_size, seed=a.seed, shuffle=not a.no_shuffle,
                              progress=not a.no_progress)
    except (ValueError, OSError) as err:  # an empty source folder, other work in OUT_DIR, a full disk
        print(f"iwm-make-shards: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    _report(a.out_dir, state, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
