"""What a run's config asks of this machine, checked before anything is written: the run directory, the data
(the registry's checks, against the run's saved data position), the device, and a global batch that splits
evenly over the ranks torchrun will start."""
import os

from ..config import ConfigError


def world_size_from_env():
    """The number of ranks torchrun (or SLURM through it) will start: WORLD_SIZE, else 1."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def _check_out_dir(out_dir):
    if not out_dir.strip():
        raise ConfigError("train.out_dir is empty; give the run directory (a folder to create or to resume)")
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):  # the nearest existing ancestor must be a folder to create the rest in
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if path == os.path.abspath(out_dir) else f"is inside {path}, which is a file"
        raise ConfigError(f"train.out_dir {out_dir} {what}, not a folder; give a run directory")


def check_environment(cfg, world_size=None):
    """What the config asks of this machine: the run directory, the data, the device, and a batch that splits
    evenly."""
    t = cfg.train
    _check_out_dir(t.out_dir)
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible (use train.device=cpu or auto)")
    world = world_size_from_env() if world_size is None else world_size
    if t.batch_size % (world * t.accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the world size {world} x "
                          f"train.accum_steps={t.accum_steps} = {world * t.accum_steps}")
    from .data import check_data

    check_data(cfg, world)
