"""Typed run configuration: dataclasses, YAML files under configs/, and ``key=value`` overrides.

Every dotted key (``train.steps``, ``model.size``, ...) is a field below; an unknown key is an error that names it.
"""
import dataclasses
import typing
from dataclasses import dataclass, field

import yaml

from ..transforms.config import TransformConfig


@dataclass
class ModelConfig:
    size: str = "base"            # tiny, small, base, large, huge, giant (iwm_fast.models.VIT_SIZES)
    patch_size: int = 16
    depth: int = 0                # 0: the size's own depth; a smaller value makes a shallower encoder
    attn_backend: str = "auto"    # auto, triton, sdpa, flash_attn, xformers
    patch_init_std: float = 0.0   # 0: I-JEPA's 0.02 for the patch embedding too; else its own init std


@dataclass
class PredictorConfig:
    preset: str = "iwm-equi"      # iwm-equi (18x384), iwm-inv (12x384), ijepa (12x384, unconditioned, per block);
    # the fields below replace the preset's value where set (0 or ""); preset "" needs them all
    depth: int = 0
    width: int = 0
    num_heads: int = 0            # 0: the encoder's head count, as in I-JEPA
    conditioning: str = ""        # feature (IWM default), sequence, none (I-JEPA)
    target_mode: str = ""         # union (IWM) or per_block (I-JEPA)


@dataclass
class DataConfig:
    dataset: str = "digits"       # digits (bundled with scikit-learn) or imagefolder
    root: str = ""                # class-subfolder tree of JPEG/PNG files, for imagefolder
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    num_workers: int = 2
    # (dataset may also be shards: root is then a folder of .tar shards, or a comma list; iwm_fast.data.registry)
    decode: str = "cpu"           # cpu (PIL in workers) or gpu (nvJPEG via torchvision; falls back to cpu with a note)
    max_image_pixels: int = 64_000_000  # larger images are skipped unread (decompression bombs); 0: no limit


@dataclass
class MaskConfig:
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256         # global batch, split evenly over the ranks
    seed: int = 0
    out_dir: str = "runs/default"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: tuple[float, float] = (0.04, 0.4)
    ema_momentum: tuple[float, float] = (0.996, 1.0)
    grad_clip: float = 0.0        # 0 disables clipping
    accum_steps: int = 1
    precision: str = "auto"       # auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32
    compile: bool = False
    activation_checkpointing: bool = False
    loss: str = "l2"              # l2 (IWM) or smooth_l1 (I-JEPA's release)
    log_every: int = 10
    max_bad_steps: int = 5        # consecutive non-finite losses before the run stops
    device: str = "auto"          # auto, cpu, cuda
    term_grace_s: float = 120.0   # after SIGTERM: seconds to reach a step boundary and save before exiting anyway


@dataclass
class EvalConfig:
    enabled: bool = True
    bank_size: int = 256
    num_queries: int = 64
    probe_epochs: int = 100
    max_train_images: int = 2000


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    augment: TransformConfig = field(default_factory=TransformConfig)  # views: colour jitter and destructive transforms
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: bool = False         # write a torch.profiler trace of a few steps and a per-kernel table


class ConfigError(ValueError):
    pass


def _coerce(value, hint, key):
    origin = typing.get_origin(hint)
    if hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list like [a, b], got {value!r}")
        return tuple(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ConfigError(f"{key} must be a pair like [a, b], got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, typing.get_args(hint)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        return str(value)
    return value


def _set(cfg, dotted, value):
    node, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            prefix = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {dotted!r}: {prefix} has no field {part!r} "
                              f"(known: {', '.join(sorted(names))})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted} is a section; give its fields, not {value!r}")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v)
                return
            hint = typing.get_type_hints(type(node))[part]
            setattr(node, part, _coerce(value, hint, dotted))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(parts[:i + 1])} is not a section")


def _flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def apply_overrides(cfg, overrides):
    """Apply ``key=value`` strings; values are parsed as YAML (``train.steps=100``, ``masks.target_scale=[0.1,0.2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return cfg


def load_config(path=None, overrides=()):
    cfg = Config()
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        for key, value in _flatten(data):
            _set(cfg, key, value)
    apply_overrides(cfg, overrides)
    try:  # re-run the sections' own validation on the final values
        cfg.augment = dataclasses.replace(cfg.augment)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"augment: {e}") from None
    return cfg


def to_dict(cfg):
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
