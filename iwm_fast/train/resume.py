"""Whether a run directory's checkpoints may be resumed under the config given now."""
import os

from ..config import to_dict


# Sections whose change makes a checkpoint unusable (shapes) or its continuation a different run.
RESUME_KEYS = ("model", "predictor", "data", "masks", "augment", "train.seed", "train.batch_size", "train.loss")
# Fields of those sections that do not change the result: the loader's worker count only spreads the same
# decoding over more processes (the shard reader, whose order does depend on it, refuses the change itself).
IGNORED = {"data": ("num_workers",)}


class ResumeError(ValueError):
    """A run directory that cannot be resumed under the config given now."""


def check_resumable(cfg, run):
    """A run directory (``RunDir``) with checkpoints resumes only under the same model, data and recipe."""
    if not os.path.exists(run.config_path):
        return
    saved, now = to_dict(run.read_config()), to_dict(cfg)
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
        raise ResumeError(f"{run.path} holds checkpoints of a different run ({'; '.join(diffs)}); "
                          "resume with the same config, or pick another train.out_dir")
