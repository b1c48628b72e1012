"""Whether a run directory's checkpoints may be resumed under the config given now."""
import os

from .config import load_config, to_dict


# Sections whose change makes a checkpoint unusable (shapes) or its continuation a different run.
RESUME_KEYS = ("model", "predictor", "data", "masks", "augment", "train.seed", "train.batch_size", "train.loss")


def check_resumable(cfg, run_dir):
    """A run directory with checkpoints resumes only under the same model, data and recipe."""
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(saved_path):
        return
    saved, now = to_dict(load_config(saved_path)), to_dict(cfg)
    diffs = []
    for key in RESUME_KEYS:
        section, _, field = key.partition(".")
        a, b = saved[section], now[section]
        if field:
            a, b = a[field], b[field]
        if a != b:
            diffs.append(f"{key}: {a!r} in the run, {b!r} now")
    if diffs:
        raise ValueError(f"{run_dir} holds checkpoints of a different run ({'; '.join(diffs)}); "
                         "resume with the same config, or pick another train.out_dir")
