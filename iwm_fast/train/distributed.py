"""The process group and the device of this rank: torchrun's group when there is one, else a one-process group."""
import os

import torch
import torch.distributed as dist

from .choices import DEVICES


def init_distributed(device_pref="auto"):
    """Join torchrun's process group if there is one, else start a one-process gloo group.

    Returns ``(rank, world_size, device)``."""
    if device_pref not in DEVICES:
        raise ValueError(f"unknown device {device_pref!r}; choose one of {', '.join(DEVICES)}")
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if not dist.is_initialized():
        backend = "nccl" if device_pref == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:  # a single process: an in-memory store, no port to pick or collide on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_pref == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def leave_process_group():
    # Tear the group down before the interpreter exits, so no rank's communicator threads outlive it.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
