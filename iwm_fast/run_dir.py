"""A run directory: the one owner of its file names, its saved config, and "the newest checkpoint that verifies
-> the model".

    RUN/config.yaml          the run's config (``read_config``, ``write_config``)
    RUN/checkpoints/         step_XXXXXXXX/ folders (``iwm_fast.train.checkpoint``)
    RUN/metrics.csv          one row per step; RUN/tensorboard/ the same for TensorBoard
    RUN/target_encoder.pt    the exported target encoder of a finished run
    RUN/eval.json            the evaluation; RUN/world_model.png and RUN/loss_curve.png its pictures
    RUN/profile_trace.json   with profile=true, and RUN/profile_kernels.txt its per-kernel table
    RUN/<name>.json          a fine-tuning's results; RUN/<name>/ its own run directory (checkpoints, metrics)
    RUN/outputs.json         which checkpoint each output above came from (``record_output``, ``is_current``)
    RUN/.lock                the writer lock (``iwm_fast.run_lock``); RUN/.outputs.lock the outputs' one

Every check costs a file read at most once per ``RunDir``: the config is read and parsed once, each checkpoint is
verified against its checksums once, so a start-up that looks for the newest checkpoint, compares configs and
then loads it reads each file one time.
"""
import copy
import dataclasses
import json
import logging
import os
import warnings

from .train import checkpoint as ckpt
from .config import ConfigError, _read_yaml, from_dict, to_dict

log = logging.getLogger("iwm_fast")

_ROTATION_RETRIES = 5  # a trainer saving faster than a checkpoint loads would need more


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: object         # the run's Config
    model: object       # the IWM module of ``build_iwm(cfg)``, with the checkpoint's weights
    step: int           # the training step the checkpoint was saved at
    checkpoint: str     # the checkpoint folder it was loaded from


class RunDir:
    """The paths of one run and the reads that need a file system (see the module docstring)."""

    def __init__(self, path):
        self.path = path.path if isinstance(path, RunDir) else os.fspath(path)
        self._config = None
        self._checked = {}  # checkpoint folder -> None (verified) or why it failed

    def __repr__(self):
        return f"RunDir({self.path!r})"

    def _file(self, name):
        return os.path.join(self.path, name)

    config_path = property(lambda self: self._file("config.yaml"))
    metrics_path = property(lambda self: self._file("metrics.csv"))
    eval_path = property(lambda self: self._file("eval.json"))
    export_path = property(lambda self: self._file("target_encoder.pt"))
    world_model_png = property(lambda self: self._file("world_model.png"))
    loss_curve_png = property(lambda self: self._file("loss_curve.png"))
    checkpoints_dir = property(lambda self: self._file("checkpoints"))
    tensorboard_dir = property(lambda self: self._file("tensorboard"))
    profile_trace_path = property(lambda self: self._file("profile_trace.json"))
    profile_table_path = property(lambda self: self._file("profile_kernels.txt"))
    outputs_path = property(lambda self: self._file("outputs.json"))
    lock_path = property(lambda self: self._file(".lock"))
    outputs_lock_path = property(lambda self: self._file(".outputs.lock"))

    def finetune_path(self, name):
        """The results (JSON) of the fine-tuning ``name`` (``finetune_<protocol>``)."""
        return self._file(f"{name}.json")

    def finetune_run(self, name):
        """The fine-tuning ``name``'s own run directory: its checkpoints, metrics and TensorBoard logs."""
        return RunDir(self._file(name))

    # ------------------------------------------------------------------ config
    def read_config(self, overrides=()):
        """The run's saved config, then ``overrides`` (``key=value``). The file is read once per RunDir; an
        emptied or damaged file is a ConfigError naming it, a bad override one naming the override."""
        if self._config is None:
            self._config = self._read_saved_config()
        if not overrides:
            return copy.deepcopy(self._config)
        try:
            return from_dict(to_dict(self._config), overrides)
        except ConfigError as e:
            what = "override" if len(overrides) == 1 else "overrides"
            raise ConfigError(f"bad {what} {' '.join(overrides)}: {e}") from None

    def _read_saved_config(self):
        path = self.config_path
        if not os.path.exists(path):
            raise FileNotFoundError(f"{self.path} is not a run directory: it has no config.yaml")
        try:
            data = _read_yaml(path)
        except ConfigError as e:
            raise ConfigError(f"{path} is not a valid run config ({e}); restore it, or delete it to resume "
                              "under the config given now") from None
        if not data:  # an empty file would read as all defaults, a config the run never had
            raise ConfigError(f"{path} is empty, so this run's config is unknown; restore it from a backup, or "
                              "delete it to resume under the config given now (a checkpoint of another model is "
                              "still refused)")
        try:
            return from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path} is not a valid run config ({e}); restore it, or delete it to resume "
                              "under the config given now") from None

    def write_config(self, cfg):
        """Save ``cfg`` as the run's config.yaml, atomically (a crash leaves the old file or the new one)."""
        import yaml

        os.makedirs(self.path, exist_ok=True)
        tmp = self.config_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.config_path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self._config = copy.deepcopy(cfg)
        return self.config_path

    # ------------------------------------------------------------------ checkpoints
    def _verify(self, path):
        if path not in self._checked:
            try:
                ckpt.verify_checkpoint(path)
                self._checked[path] = None
            except ckpt.CheckpointError as e:
                self._checked[path] = str(e)
        if self._checked[path] is not None:
            raise ckpt.CheckpointError(self._checked[path])

    def latest_checkpoint(self):
        """The newest complete checkpoint whose files verify, or None; each newer one that does not is logged and
        skipped. Each checkpoint is verified at most once per RunDir."""
        return ckpt.latest_checkpoint(self.checkpoints_dir, verify=self._verify)

    def mark_saved(self, path):
        """A checkpoint this process has just written and hashed (it may replace a damaged one of the same step):
        it counts as verified without being read back."""
        self._checked[path] = None

    def checkpoint_record(self, path):
        """Which checkpoint an output comes from: its step, folder name and the checksum of its meta.json (which
        covers every file's checksum, so another model trained to the same step has another record)."""
        meta = ckpt.read_meta(path)
        return {"step": meta["step"], "checkpoint": os.path.basename(path),
                "digest": meta.get("meta_digest") or ckpt._meta_digest(meta)}

    def output_records(self):
        """``{file name: checkpoint record}`` of the outputs written with a record; {} where there is none (an
        unreadable outputs.json makes every output out of date, never current)."""
        try:
            with open(self.outputs_path) as f:
                records = json.load(f)
        except (OSError, ValueError):
            return {}
        return records if isinstance(records, dict) else {}

    def is_current(self, path, record):
        """Whether the output ``path`` exists and was written from the checkpoint ``record`` describes."""
        return os.path.exists(path) and record is not None and self.output_records().get(
            os.path.basename(path)) == record

    def record_output(self, path, record):
        """Record that the output ``path`` comes from the checkpoint ``record`` describes (None: from no known
        checkpoint, written before a file is replaced). Hold ``run_lock.outputs_lock`` around the file's write
        and its records."""
        from .eval.report import write_json

        records = self.output_records()
        records[os.path.basename(path)] = record
        write_json(self.outputs_path, {k: v for k, v in records.items() if v is not None})

    def load_model(self, device="cpu", *, backends=None, cfg=None):
        """The run's IWM (``build_iwm``) with the weights of its newest checkpoint that verifies, on ``device``.
        ``cfg`` defaults to the run's config. One FileNotFoundError naming the folder when there is no run or no
        checkpoint; a checkpoint of another model is a CheckpointError naming the differences. A checkpoint that
        a running trainer removes while it is read (rotation) is logged, and the newest one left is loaded."""
        cfg = self.read_config() if cfg is None else cfg
        for _ in range(_ROTATION_RETRIES):
            path = self.latest_checkpoint()
            if path is None and not self._forget_vanished():
                raise FileNotFoundError(f"{self.path} holds no weights: no complete checkpoint that verifies in "
                                        f"{self.checkpoints_dir} (train it first)")
            if path is None:
                continue
            try:
                model, meta = self._load(path, cfg, backends)
            except ckpt.CheckpointError:
                if not self._forget_vanished():
                    raise
                log.warning("%s was removed while it was read (a running trainer rotates its checkpoints); "
                            "loading the newest checkpoint left", path)
                continue
            return LoadedModel(cfg=cfg, model=model.to(device), step=meta["step"], checkpoint=path)
        raise ckpt.CheckpointError(f"the checkpoints in {self.checkpoints_dir} were replaced {_ROTATION_RETRIES} "
                                   "times while they were read; run again")

    def _load(self, path, cfg, backends):
        from .models import build_iwm

        model = build_iwm(cfg, backends)
        with warnings.catch_warnings():  # DCP's note that it loads in one process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            meta = ckpt.load_checkpoint(path, model, verify=False)  # verified by latest_checkpoint
        return model, meta

    def _forget_vanished(self):
        """Forget the verdicts on checkpoint folders that are gone; whether there were any (a trainer's rotation
        removed what was being read, so the newest checkpoint is looked for again)."""
        gone = [p for p in self._checked if not os.path.exists(os.path.join(p, ckpt.META))]
        for p in gone:
            del self._checked[p]
        return bool(gone)
