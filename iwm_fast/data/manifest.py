"""The manifest of a shard set: ``FOLDER/manifest.json``, written last, so a set without one is not complete.

``iwm-make-shards`` writes it once every shard is in place (``iwm-make-shards --index FOLDER`` for shards
written by another tool)::

    {"format": "iwm-fast-shards/1", "samples": 160, "unlabelled": 0, "classes": ["c0", ...],
     "shards": [{"name": "shard-000000.tar", "samples": 40, "unlabelled": 0, "bytes": 81920,
                 "xxh3_128": "..."}, ...],
     "skipped": [{"path": "c1/x.jpg", "reason": "PermissionError: ..."}], "plan": {...}}

Training reads shards only through ``shard_set``, which refuses a folder without a manifest, a listed shard
that is missing or whose size differs from the one recorded, and a ``.tar`` the manifest does not list. It
compares sizes, not checksums (hashing every shard at each start would re-read the whole set, on every
rank): ``iwm-make-shards --verify FOLDER`` checks the checksums. ``digest`` identifies the set's contents for
the checkpoint's data position.
"""
import json
import os
import tarfile
from dataclasses import dataclass

from ..checksum import HASH, hash_file

FORMAT = "iwm-fast-shards/1"
MANIFEST = "manifest.json"
PLAN = "conversion.json"  # written first by iwm-make-shards, removed after the manifest: a conversion under way


class ShardSetError(ValueError):
    """A shard set that cannot be trained on as it is; the message names the folder or shard and the fix."""


def describe_shard(path):
    """``(record, keys)``: the manifest entry of one tar (samples, unlabelled, bytes, checksum) and its
    sample keys in order. A tar whose structure breaks is a ShardSetError naming where."""
    from .shards import read_samples

    keys, unlabelled = [], 0
    try:
        for _, key, group in read_samples(path):
            keys.append(key)
            unlabelled += int(not _has_label(group))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardSetError(f"shard {path} is broken after {len(keys)} samples ({type(err).__name__}: {err})") \
            from None
    record = {"name": os.path.basename(path), "samples": len(keys), "unlabelled": unlabelled,
              "bytes": os.path.getsize(path), HASH: hash_file(path)}
    return record, keys


def _has_label(group):
    try:
        int(group["cls"].decode().strip())
        return True
    except (KeyError, ValueError, UnicodeDecodeError):
        return False


def write_manifest(folder, shards, *, classes, skipped=(), plan=None):
    """Write ``folder/manifest.json`` atomically (a temporary file renamed into place) from shard records."""
    body = {"format": FORMAT, "samples": sum(s["samples"] for s in shards),
            "unlabelled": sum(s["unlabelled"] for s in shards), "classes": list(classes),
            "shards": list(shards), "skipped": list(skipped)}
    if plan is not None:
        body["plan"] = plan
    path = os.path.join(folder, MANIFEST)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return body


def read_manifest(folder):
    """The manifest of ``folder`` as a dict; a ShardSetError saying why there is none or it is unusable."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise ShardSetError(_no_manifest(folder))
    try:
        with open(path) as f:
            body = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardSetError(f"{path} is unreadable ({err}); rebuild the shard set, or delete the file and run "
                            f"iwm-make-shards --index {folder}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("shards"), list):
        raise ShardSetError(f"{path} is not a shard manifest of format {FORMAT}")
    return body


def _no_manifest(folder):
    if os.path.exists(os.path.join(folder, PLAN)):
        return (f"shard folder {folder} holds an unfinished iwm-make-shards conversion (no manifest.json yet); "
                "run the same iwm-make-shards command again to finish it")
    if not any(n.endswith(".tar") for n in os.listdir(folder)):
        return f"shard folder {folder} holds no .tar shards"
    return (f"shard folder {folder} has no manifest.json, so whether its shards are complete is unknown; "
            f"for shards written by another tool, iwm-make-shards --index {folder} checks them and writes one")


def check_files(folder, body):
    """Every listed shard present with its recorded size, and no unlisted ``.tar``; returns the records."""
    listed = {s["name"]: s for s in body["shards"]}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar") and name not in listed:
            raise ShardSetError(f"{os.path.join(folder, name)} is not listed in {MANIFEST} (added after the set "
                                "was written?); move it out, or rebuild the set")
    for name, rec in listed.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ShardSetError(f"shard {path}, listed in {MANIFEST}, is missing")
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            raise ShardSetError(f"shard {path} has {size} bytes but {MANIFEST} records {rec['bytes']} (truncated "
                                f"or replaced); iwm-make-shards --verify {folder} checks every shard")
    return listed


def verify_checksums(folder):
    """Lines naming each shard whose checksum differs from the manifest's (empty: all verify)."""
    body = read_manifest(folder)
    check_files(folder, body)
    return [f"{os.path.join(folder, s['name'])}: checksum differs from {MANIFEST}" for s in body["shards"]
            if hash_file(os.path.join(folder, s["name"])) != s[HASH]]


@dataclass(frozen=True)
class ShardSet:
    paths: tuple        # sorted absolute tar paths
    samples: tuple      # samples per path, as the manifests record
    unlabelled: int     # samples without a .cls label
    skipped: int        # source files iwm-make-shards could not read
    digest: str         # the contents' identity: names and checksums


def shard_set(root):
    """The checked shard set of ``root``: a folder, a tar file, or a comma list of both; each folder (and each
    tar's folder) must hold a manifest that lists its tars (``check_files``)."""
    parts = [p.strip() for p in str(root).split(",") if p.strip()]
    if not parts:
        raise ShardSetError("data.dataset=shards needs data.root: a folder of .tar shards, or a comma list of them")
    records, skipped, manifests = {}, 0, {}
    for part in parts:
        if not os.path.exists(part):
            raise ShardSetError(f"shard path {part!r} does not exist")
        folder = part if os.path.isdir(part) else os.path.dirname(os.path.abspath(part))
        key = os.path.realpath(folder)
        if key not in manifests:
            body = read_manifest(folder)
            manifests[key] = (body, check_files(folder, body))
            skipped += len(body.get("skipped", ()))
        body, listed = manifests[key]
        if os.path.isdir(part):
            chosen = list(listed.values())
        elif os.path.basename(part) in listed:
            chosen = [listed[os.path.basename(part)]]
        else:
            raise ShardSetError(f"shard {part} is not listed in {os.path.join(folder, MANIFEST)}")
        for rec in chosen:
            records[os.path.abspath(os.path.join(folder, rec["name"]))] = rec
    return _shard_set(records, skipped)


def _shard_set(records, skipped):
    import xxhash

    paths = tuple(sorted(records))
    digest = xxhash.xxh3_128("".join(f"{os.path.basename(p)}:{records[p][HASH]}\n" for p in paths).encode())
    return ShardSet(paths, tuple(records[p]["samples"] for p in paths),
                    sum(records[p].get("unlabelled", 0) for p in paths), skipped, digest.hexdigest())
