"""Atomic, sharded, checksummed checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``RUN_DIR/checkpoints/step_00001000/`` holds the DCP shards of model and optimizer, one
``rng_rank{r}.pt`` per rank, and ``meta.json`` (step, data position, world size, and the size and checksum of
every other file in the folder). Every rank writes into a ``.tmp-step_...`` folder first and hashes the files
it wrote; only when all ranks are done does rank 0 write ``meta.json`` and rename the folder. A run killed at
any moment therefore leaves either the old set of complete checkpoints or the new one: a folder without
``meta.json`` or with the temporary prefix is never picked up.

Checksums: xxHash's XXH3-128, not SHA-256. They guard against accidental damage (a truncated copy, a flipped
bit, a half-synced file system), not against an adversary, and a 128-bit hash misses a random corruption
with probability 2^-128 either way; XXH3 hashes about 3.5x faster than SHA-256 here (3.4-3.8 GB/s against
0.9-1.1 GB/s on the 2-core development machine, 256 MB buffers), which matters when every resume re-reads a
ViT-H checkpoint with its optimizer state (about 10 GB).
"""
import errno
import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checksum import HASH
from ..checksum import hash_file as _hash_file  # a module global: tests count its calls
from .files import fsync_dir

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"

log = logging.getLogger("iwm_fast")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or used; the message names the folder or file."""


class DiskFullError(CheckpointError):
    pass


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _world():
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _step_of(path):
    try:
        return int(os.path.basename(path)[len(PREFIX):])
    except ValueError:
        return None


def complete_checkpoints(ckpt_dir):
    """Complete checkpoint folders (those holding meta.json), oldest first. Their contents are not checked."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name.startswith(PREFIX) and os.path.isfile(os.path.join(path, META)):
            step = _step_of(path)
            if step is not None:
                found.append((step, path))
    return [p for _, p in sorted(found)]


# ---------------------------------------------------------------- checksums and verification

def _file_record(folder, name):
    path = os.path.join(folder, name)
    return {"bytes": os.path.getsize(path), HASH: _hash_file(path)}


def _written_by(name, rank):
    """Whether ``rank`` wrote ``name`` (DCP shards are ``__{rank}_*.distcp``; rank 0 writes ``.metadata``)."""
    m = re.match(r"__(\d+)_", name) or re.match(r"rng_rank(\d+)\.pt$", name)
    return int(m.group(1)) == rank if m else rank == 0


def _meta_digest(meta):
    import xxhash

    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    return xxhash.xxh3_128(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_meta(path):
    """The checkpoint's ``meta.json`` as a dict; a CheckpointError naming the file when it is unusable."""
    meta_path = os.path.join(path, META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path} is missing: the checkpoint was never completed") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_path} is damaged: it holds no step number")
    if "meta_digest" in meta and meta["meta_digest"] != _meta_digest(meta):
        raise CheckpointError(f"{meta_path} is damaged: its contents differ from its own checksum")
    return meta


def verify_checkpoint(path):
    """Check every file of a complete checkpoint against the sizes and checksums in its meta.json.

    Returns the meta dict; raises CheckpointError naming the first missing, truncated or corrupted file.
    Checkpoints written before checksums were stored are accepted with a warning.
    """
    meta = read_meta(path)
    files = meta.get("files")
    if files is None:
        log.warning("%s was written without checksums: its files cannot be verified", path)
        return meta
    for name in sorted(files):
        record, file = files[name], os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing")
        size = os.path.getsize(file)
        if size != record["bytes"]:
            raise CheckpointError(f"{file} is truncated or damaged: {size} bytes, meta.json records "
                                  f"{record['bytes']}")
        try:
            digest = _hash_file(file)
        except OSError as e:
            raise CheckpointError(f"{file} is unreadable ({e})") from None
        if digest != record.get(HASH):
            raise CheckpointError(f"{file} is corrupted: its checksum differs from the one in meta.json")
    return meta


def latest_valid_checkpoint(ckpt_dir, *, verify=verify_checkpoint):
    """``(path, skipped)``: the newest complete checkpoint whose files verify (None if there is none), and one
    line per newer checkpoint skipped, saying why. ``verify(path)`` raises CheckpointError for a bad one
    (``iwm_fast.run_dir.RunDir`` passes its own, which verifies each checkpoint once)."""
    skipped = []
    for path in reversed(complete_checkpoints(ckpt_dir)):
        try:
            verify(path)
        except CheckpointError as e:
            skipped.append(f"skipped {path}: {e}")
            continue
        return path, skipped
    return None, skipped


def latest_checkpoint(ckpt_dir, *, verify=True):
    """The newest complete checkpoint that verifies (logging each newer one skipped and why), or None.
    ``verify``: False takes the newest complete one unchecked; a callable replaces ``verify_checkpoint``."""
    if not verify:
        done = complete_checkpoints(ckpt_dir)
        return done[-1] if done else None
    path, skipped = latest_valid_checkpoint(ckpt_dir, verify=verify_checkpoint if verify is True else verify)
    if _rank() == 0:
        for line in skipped:
            log.warning("%s", line)
        if skipped and path is not None:
            log.warning("falling back to %s", path)
    return path


# ---------------------------------------------------------------- RNG state

def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save

def _state_bytes(state):
    """Bytes of the tensors in a (nested) state dict; a DTensor counts with its global size, as DCP stores it."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _is_disk_full(exc):
    """Whether ENOSPC (or a quota) caused ``exc``, looking through DCP's per-rank wrappers and exception chains."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        if isinstance(e, CheckpointException):
            todo.extend(exc_pair[0] for exc_pair in e.failures.values())
        todo.extend([e.__cause__, e.__context__])
    return False


def _save_error(exc, ckpt_dir, name, need):
    previous = [p for p in complete_checkpoints(ckpt_dir)]
    kept = (f"the last good checkpoint {previous[-1]} is kept" if previous
            else "there is no earlier checkpoint")
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    # torch.save's zip writer reports a full disk as "unexpected pos ...", without the errno: a failed write
    # with less free space left than the checkpoint needs is taken as a full disk too.
    if _is_disk_full(exc) or (free is not None and free < need):
        have = f", {_fmt_bytes(free)} free there" if free is not None else ""
        return DiskFullError(f"disk full: saving checkpoint {name} in {ckpt_dir} needs about {_fmt_bytes(need)} "
                             f"(model and optimizer state){have}; {kept}. Free some space (or point "
                             f"train.out_dir elsewhere) and rerun the same command to resume")
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"saving checkpoint {name} in {ckpt_dir} failed ({reason}); {kept}")


def save_checkpoint(ckpt_dir, step, model, optimizer, meta, keep=2):
    """Save atomically; ``meta`` (JSON-able: step, data position, schedules) is written last, by rank 0, with the
    size and checksum of every file. A failure (a full disk) raises CheckpointError and keeps the older ones."""
    name = f"{PREFIX}{step:08d}"
    tmp = os.path.join(ckpt_dir, TMP_PREFIX + name)
    final = os.path.join(ckpt_dir, name)
    rank, world = _rank(), _world()
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json, or one we resumed past
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    need = _state_bytes(model_sd) + _state_bytes(optim_sd)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        _barrier()
        # Each rank hashes the files it wrote; rank 0 hashes whatever no rank claimed.
        mine = {n: _file_record(tmp, n) for n in sorted(os.listdir(tmp)) if _written_by(n, rank)}
        gathered = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if rank == 0:
            files = {}
            for part in gathered:
                files.update(part)
            for n in sorted(os.listdir(tmp)):
                if n not in files and n != META:
                    files[n] = _file_record(tmp, n)
            record = {**meta, "step": step, "world_size": world, "hash": HASH, "files": files}
            record["meta_digest"] = _meta_digest(record)
            meta_path = os.path.join(tmp, META)
            with open(meta_path, "w") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(ckpt_dir)
    except (Exception, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the older checkpoints stay
        raise _save_error(e, ckpt_dir, name, need) from e
    if rank == 0 and keep > 0:
        # Rotate among the checkpoints up to this step; later ones (left by a run resumed past a damaged one)
        # are replaced when the run reaches them.
        older = [p for p in complete_checkpoints(ckpt_dir) if _step_of(p) <= step]
        for old in older[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# ---------------------------------------------------------------- load

def _group(keys, limit=3):
    """``encoder.blocks.1.*`` for the keys of one numbered block, so a message stays one readable line."""
    groups = {}
    for k in sorted(keys, key=_natural):
        parts = k.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        head = ".".join(parts[:cut + 1]) if cut is not None and cut < len(parts) - 1 else k
        groups.setdefault(head, []).append(k)
    names = [h + ".*" if len(ks) > 1 else ks[0] for h, ks in groups.items()]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _natural(key):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def check_model_matches(path, model_sd):
    """Raise CheckpointError naming the first differences when the checkpoint's model keys or shapes differ."""
    try:
        md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"{os.path.join(path, '.metadata')} is unreadable ({e})") from None
    saved = {k[len("model."):]: getattr(v, "size", None) for k, v in md.items() if k.startswith("model.")}
    have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in model_sd.items()}
    missing = [k for k in have if k not in saved]
    unexpected = [k for k in saved if k not in have]
    shapes = [k for k in have if k in saved and have[k] is not None and saved[k] is not None
              and tuple(saved[k]) != have[k]]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"the model has {len(missing)} keys it lacks ({_group(missing)})")
    if unexpected:
        parts.append(f"it has {len(unexpected)} keys the model lacks ({_group(unexpected)})")
    if shapes:
        k = sorted(shapes, key=_natural)[0]
        more = f" and {len(shapes) - 1} more shapes differ" if len(shapes) > 1 else ""
        parts.append(f"shape of {k}: {list(saved[k])} in the checkpoint vs {list(have[k])} in the model{more}")
    raise CheckpointError(f"checkpoint {path} holds a different model: {'; '.join(parts)}")


def load_checkpoint(path, model, optimizer=None, *, verify=True):
    """Load model (and optimizer) state from a complete checkpoint; returns its ``meta`` dict.

    Strict: every model key and shape must match the checkpoint's. The files are verified against their
    checksums first (``verify=False`` skips that); every error is a CheckpointError naming the file.
    """
    meta = verify_checkpoint(path) if verify else read_meta(path)
    try:
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            check_model_matches(path, model_sd)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

            state = {"model": get_model_state_dict(model)}
            check_model_matches(path, state["model"])
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(model, state["model"])
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} could not be loaded ({reason})") from e
    rng = os.path.join(path, f"rng_rank{_rank()}.pt")
    if meta.get("world_size") == _world() and os.path.exists(rng):
        try:
            state = torch.load(rng, weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{rng} is unreadable ({e})") from None
        set_rng_state(state)
    return meta


# ---------------------------------------------------------------- export

def full_model_state(model):
    """The whole (unsharded) model state on the CPU, gathered on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_target_encoder(model_state, path):
    """Write the target encoder as a plain state dict that an I-JEPA-format ``VisionTransformer`` loads."""
    prefix = "target_encoder."
    sd = {k[len(prefix):]: v.clone() for k, v in model_state.items() if k.startswith(prefix)}
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        if _is_disk_full(e) or shutil.disk_usage(folder).free < _state_bytes(sd):
            raise DiskFullError(f"disk full: writing {path} needs about {_fmt_bytes(_state_bytes(sd))}, "
                                f"{_fmt_bytes(shutil.disk_usage(folder).free)} free in {folder}") from e
        raise CheckpointError(f"could not write {path} ({e})") from e
    return path
