"""Atomic, sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``RUN_DIR/checkpoints/step_00001000/`` holds the DCP shards of model and optimizer, one
``rng_rank{r}.pt`` per rank, and ``meta.json`` (step, data position, world size). Every rank writes into a
``.tmp-step_...`` folder first; only when all ranks are done does rank 0 write ``meta.json`` and rename the folder.
A run killed at any moment therefore leaves either the old set of complete checkpoints or the new one:
a folder without ``meta.json`` or with the temporary prefix is never picked up.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(ckpt_dir):
    """Complete checkpoint folders, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name.startswith(PREFIX) and os.path.isfile(os.path.join(path, META)):
            try:
                found.append((int(name[len(PREFIX):]), path))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir):
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


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


def save_checkpoint(ckpt_dir, step, model, optimizer, meta, keep=2):
    """Save atomically; ``meta`` (JSON-able: step, data position, schedules) is written last, by rank 0."""
    name = f"{PREFIX}{step:08d}"
    tmp = os.path.join(ckpt_dir, TMP_PREFIX + name)
    final = os.path.join(ckpt_dir, name)
    if _rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json from a killed save
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        meta_path = os.path.join(tmp, META)
        with open(meta_path, "w") as f:
            json.dump({**meta, "step": step, "world_size": world}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path, model, optimizer=None):
    """Load model (and optimizer) state from a complete checkpoint; returns its ``meta`` dict."""
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
    rng = os.path.join(path, f"rng_rank{_rank()}.pt")
    if meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1) and os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    return meta


def full_model_state(model):
    """The whole (unsharded) model state on the CPU, gathered on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_target_encoder(model_state, path):
    """Write the target encoder as a plain state dict that an I-JEPA-format ``VisionTransformer`` loads."""
    prefix = "target_encoder."
    sd = {k[len(prefix):]: v.clone() for k, v in model_state.items() if k.startswith(prefix)}
    tmp = path + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return path
