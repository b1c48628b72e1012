"""Typed run configuration: dataclasses, YAML files under configs/, and ``key=value`` overrides.

Every dotted key (``train.steps``, ``model.size``, ...) is a field below; an unknown key is an error that names it.
"""
import dataclasses
import math
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
    """Apply ``key=value`` strings; values are parsed as YAML (``train.steps=100``,
    ``masks.target_scale=[0.1,0.2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: {raw!r} is not a valid YAML value") from None
        _set(cfg, key.strip(), value)
    return cfg


def _read_yaml(path):
    """The mapping in a YAML config file; one clear ConfigError for a missing, unreadable or malformed one."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (a YAML config is text)") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def load_config(path=None, overrides=(), *, validate_values=True):
    """Defaults, then the YAML file at ``path``, then the overrides; every value checked by ``validate``."""
    return from_dict(_read_yaml(path) if path is not None else {}, overrides, validate_values=validate_values)


def from_dict(data, overrides=(), *, validate_values=True):
    """A config from a nested dict (``to_dict``'s form, as saved with a run or a world model), then overrides."""
    cfg = Config()
    for key, value in _flatten(data):
        _set(cfg, key, value)
    apply_overrides(cfg, overrides)
    try:  # re-run the sections' own validation on the final values
        cfg.augment = dataclasses.replace(cfg.augment)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"augment: {e}") from None
    if validate_values:
        validate(cfg)
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


# ---------------------------------------------------------------- validation

def _fail(key, allowed, value):
    raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def _int_at_least(key, value, low):
    if value < low:
        _fail(key, f"an integer >= {low}", value)


def _finite_at_least(key, value, low=0.0):
    if not math.isfinite(value) or value < low:
        _fail(key, f"a finite number >= {low:g}", value)


def _one_of(key, value, allowed):
    if value not in allowed:
        _fail(key, "one of " + ", ".join(repr(a) for a in allowed), value)


def _range_pair(key, pair, *, low=0.0, high=1.0, low_open=True):
    """A pair (lo, hi) with low < lo <= hi <= high (low <= lo when not ``low_open``)."""
    lo, hi = pair
    ok_lo = lo > low if low_open else lo >= low
    if not (math.isfinite(lo) and math.isfinite(hi) and ok_lo and lo <= hi <= high):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        _fail(key, f"a pair [lo, hi] with lo <= hi, both in {bound}", list(pair))


def validate(cfg):
    """Check every value of ``cfg`` once, before anything is built or written; raises ConfigError naming the key
    and what it allows. (Where the run may write, the data root and the device are ``check_environment``'s.)"""
    from ..backends import ATTENTION
    from ..models import PREDICTOR_PRESETS, VIT_SIZES

    m, p, d, k, t, e = cfg.model, cfg.predictor, cfg.data, cfg.masks, cfg.train, cfg.eval
    _one_of("model.size", m.size, tuple(VIT_SIZES))
    _int_at_least("model.patch_size", m.patch_size, 1)
    _int_at_least("model.depth", m.depth, 0)
    _one_of("model.attn_backend", m.attn_backend, ATTENTION)
    _finite_at_least("model.patch_init_std", m.patch_init_std)

    _one_of("predictor.preset", p.preset, ("",) + tuple(PREDICTOR_PRESETS))
    for name in ("depth", "width", "num_heads"):
        _int_at_least(f"predictor.{name}", getattr(p, name), 0)
    _one_of("predictor.conditioning", p.conditioning, ("", "feature", "sequence", "none"))
    _one_of("predictor.target_mode", p.target_mode, ("", "union", "per_block"))
    if not p.preset:
        for name in ("depth", "width"):
            if getattr(p, name) <= 0:
                _fail(f"predictor.{name}", "an integer >= 1 when predictor.preset is \"\" (no preset to take it "
                      "from)", getattr(p, name))
        for name in ("conditioning", "target_mode"):
            if not getattr(p, name):
                raise ConfigError(f"predictor.{name} must be set when predictor.preset is \"\" (no preset to "
                                  "take it from)")
    width = p.width or PREDICTOR_PRESETS[p.preset].width
    heads = p.num_heads or VIT_SIZES[m.size].num_heads
    if width % heads:
        src = "predictor.num_heads" if p.num_heads else f"model.size={m.size}'s head count"
        raise ConfigError(f"predictor width {width} must be divisible by {src} ({heads})")

    from ..data import registry

    _one_of("data.dataset", d.dataset, tuple(registry.names()))
    _one_of("data.decode", d.decode, ("cpu", "gpu"))
    _int_at_least("data.max_image_pixels", d.max_image_pixels, 0)
    _int_at_least("data.image_size", d.image_size, 1)
    if d.image_size % m.patch_size:
        raise ConfigError(f"data.image_size must be divisible by model.patch_size={m.patch_size}, "
                          f"got {d.image_size!r}")
    _range_pair("data.crop_scale", d.crop_scale)
    _int_at_least("data.num_workers", d.num_workers, 0)

    _int_at_least("masks.num_targets", k.num_targets, 1)
    _range_pair("masks.target_scale", k.target_scale)
    _range_pair("masks.context_scale", k.context_scale)
    _range_pair("masks.target_aspect", k.target_aspect, high=math.inf)
    _int_at_least("masks.min_keep", k.min_keep, 0)

    for name in ("steps", "batch_size", "checkpoint_every", "accum_steps", "log_every", "max_bad_steps"):
        _int_at_least(f"train.{name}", getattr(t, name), 1)
    if not 0 <= t.seed < 2 ** 63:
        _fail("train.seed", "an integer in [0, 2**63)", t.seed)
    _int_at_least("train.keep_checkpoints", t.keep_checkpoints, 0)
    _int_at_least("train.warmup_steps", t.warmup_steps, 0)
    for name in ("lr", "start_lr", "final_lr", "grad_clip"):
        _finite_at_least(f"train.{name}", getattr(t, name))
    _finite_at_least("train.term_grace_s", t.term_grace_s)
    wd = t.weight_decay
    if not all(math.isfinite(v) and v >= 0 for v in wd):
        _fail("train.weight_decay", "a pair [start, end] of finite numbers >= 0", list(wd))
    _range_pair("train.ema_momentum", t.ema_momentum, low_open=False)
    _one_of("train.precision", t.precision, ("auto", "bf16", "fp16", "fp32"))
    _one_of("train.loss", t.loss, ("l2", "smooth_l1"))
    _one_of("train.device", t.device, ("auto", "cpu", "cuda"))

    _int_at_least("eval.bank_size", e.bank_size, 2)
    for name in ("num_queries", "probe_epochs", "max_train_images"):
        _int_at_least(f"eval.{name}", getattr(e, name), 1)
    return cfg


def world_size_from_env():
    """The number of ranks torchrun (or SLURM through it) will start: WORLD_SIZE, else 1."""
    import os

    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def _check_out_dir(out_dir):
    import os

    if not out_dir.strip():
        raise ConfigError("train.out_dir is empty; give the run directory (a folder to create or to resume)")
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):  # the nearest existing ancestor must be a folder to create the rest in
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if path == os.path.abspath(out_dir) else f"is inside {path}, which is a file"
        raise ConfigError(f"train.out_dir {out_dir} {what}, not a folder; give a run directory")


def check_environment(cfg, world_size=None):
    """What the config asks of this machine: the run directory, the data (the registry's checks, against the
    run's saved data position), the device, and a batch that splits evenly."""
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
