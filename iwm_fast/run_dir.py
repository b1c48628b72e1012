"""A run directory: the one owner of its file names, its saved config, and "the newest checkpoint that verifies
-> the model".

    RUN/config.yaml          the run's config (``read_config``, ``write_config``)
    RUN/checkpoints/         step_XXXXXXXX/ folders (``iwm_fast.train.checkpoint``)
    RUN/metrics.csv          one row per step; RUN/tensorboard/ the same for TensorBoard
    RUN/target_encoder.pt    the exported target encoder of a finished run
    RUN/eval.json            the evaluation; RUN/world_model.png and RUN/loss_curve.png its pictures
    RUN/profile_trace.json   with profile=true, and RUN/profile_kernels.txt its per-kernel table
    RUN/<name>.json          a fine-tuning's results; RUN/<name>/ its own run directory (checkpoints, metrics)

Every check costs a file read at most once per ``RunDir``: the config is read and parsed once, each checkpoint is
verified against its checksums once, so a start-up that looks for the newest checkpoint, compares configs and
then loads it reads each file one time.
"""
import copy
import dataclasses
import logging
import os
import warnings

from .train import checkpoint as ckpt
from .config import ConfigError, _read_yaml, from_dict, to_dict

log = logging.getLogger("iwm_fast")


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

    def load_model(self, device="cpu", *, backends=None, cfg=None):
        """The run's IWM (``build_iwm``) with the weights of its newest checkpoint that verifies, on ``device``.
        ``cfg`` defaults to the run's config. One FileNotFoundError naming the folder when there is no run or no
        checkpoint; a checkpoint of another model is a CheckpointError naming the differences."""
        from .models import build_iwm

        cfg = self.read_config() if cfg is None else cfg
        path = self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"{self.path} holds no weights: no complete checkpoint that verifies in "
                                    f"{self.checkpoints_dir} (train it first)")
        model = build_iwm(cfg, backends)
        with warnings.catch_warnings():  # DCP's note that it loads in one process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            meta = ckpt.load_checkpoint(path, model, verify=False)  # verified just above
        return LoadedModel(cfg=cfg, model=model.to(device), step=meta["step"], checkpoint=path)
