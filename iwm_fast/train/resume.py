"""Whether a run directory's checkpoints may be resumed under the config given now."""
import os

from ..config import ConfigError, load_config, to_dict


# Sections whose change makes a checkpoint unusable (shapes) or its continuation a different run.
RESUME_KEYS = ("model", "predictor", "data", "masks", "augment", "train.seed", "train.batch_size", "train.loss")
# Fields of those sections that do not change the result: the loader's worker count only spreads the same
# decoding over more processes (the shard reader, whose order does depend on it, refuses the change itself).
IGNORED = {"data": ("num_workers",)}


class ResumeError(ValueError):
    """A run directory that cannot be resumed under the config given now."""


def load_run_config(run_dir, overrides=()):
    """The config saved in ``run_dir/config.yaml``; an emptied or damaged file is a ConfigError saying so
    (an empty file would otherwise read as all defaults, a config the run never had)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml")
    try:
        empty = os.path.getsize(path) == 0 or not open(path, "rb").read().strip()
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from None
    if empty:
        raise ConfigError(f"{path} is empty, so this run's config is unknown; restore it from a backup, or "
                          "delete it to resume under the config given now (a checkpoint of another model is "
                          "still refused)")
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path} is not a valid run config ({e}); restore it, or delete it to resume under "
                          "the config given now") from None


def check_resumable(cfg, run_dir):
    """A run directory with checkpoints resumes only under the same model, data and recipe."""
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        return
    saved, now = to_dict(load_run_config(run_dir)), to_dict(cfg)
    diffs = []
    for key in RESUME_KEYS:
        section, _, field = key.partition(".")
        a, b = saved[section], now[section]
        if field:
            a, b = a[field], b[field]
        else:
            a, b = ({k: v for k, v in s.items() if k not in IGNORED.get(section, ())} for s in (a, b))
        if a != b:
            diffs.append(f"{key}: {a!r} in the run, {b!r} now")
    if diffs:
        raise ResumeError(f"{run_dir} holds checkpoints of a different run ({'; '.join(diffs)}); "
                          "resume with the same config, or pick another train.out_dir")
