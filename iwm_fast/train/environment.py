"""What a run's config asks of this machine, checked before anything is written: the data root, the device, and a
global batch that splits evenly over the ranks torchrun will start."""
import os

from ..config import ConfigError


def world_size_from_env():
    """The number of ranks torchrun (or SLURM through it) will start: WORLD_SIZE, else 1."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def check_environment(cfg, world_size=None):
    """What the config asks of this machine: the data root, the device, and a batch that splits evenly."""
    d, t = cfg.data, cfg.train
    if d.dataset == "imagefolder":
        if not d.root:
            raise ConfigError("data.root must be set for data.dataset=imagefolder (a folder of class subfolders)")
        if not os.path.isdir(d.root):
            what = "is not a folder" if os.path.exists(d.root) else "does not exist"
            raise ConfigError(f"data.root {d.root} {what}")
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible (use train.device=cpu or auto)")
    world = world_size_from_env() if world_size is None else world_size
    if t.batch_size % (world * t.accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the world size {world} x "
                          f"train.accum_steps={t.accum_steps} = {world * t.accum_steps}")
