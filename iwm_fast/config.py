"""Typed run configuration: dataclasses, YAML files under configs/, and ``key=value`` overrides.

Every dotted key (``train.steps``, ``model.size``, ...) is a field below; an unknown key is an error that names it.
Each section checks its own values (``validate``) against the named choices of the module that owns them, which
are light to import: this module needs neither torch nor a model, a dataset or the trainer.
The loader and overrides are hand-written (about 60 lines of coercion) rather than OmegaConf's, which would add
a dependency (antlr4-python3-runtime 4.9, published as a source archive only), or tyro's, whose syntax is
``--train.steps 100``, not ``key=value``.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field

import yaml

from .backends import ATTENTION
from .data.choices import DECODES, dataset_names
from .models.choices import CONDITIONINGS, LOSSES, PREDICTOR_PRESETS, TARGET_MODES, VIT_SIZES, resolve_predictor
from .train.choices import DEVICES, PRECISIONS
from .transforms.config import TransformConfig


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------- value checks

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


# ---------------------------------------------------------------- the schema

@dataclass
class ModelConfig:
    size: str = "base"            # a key of iwm_fast.models.choices.VIT_SIZES (tiny ... giant)
    patch_size: int = 16
    depth: int = 0                # 0: the size's own depth; a smaller value makes a shallower encoder
    attn_backend: str = "auto"    # one of iwm_fast.backends.ATTENTION
    patch_init_std: float = 0.0   # 0: I-JEPA's 0.02 for the patch embedding too; else its own init std

    def validate(self):
        _one_of("model.size", self.size, tuple(VIT_SIZES))
        _int_at_least("model.patch_size", self.patch_size, 1)
        _int_at_least("model.depth", self.depth, 0)
        _one_of("model.attn_backend", self.attn_backend, ATTENTION)
        _finite_at_least("model.patch_init_std", self.patch_init_std)


@dataclass
class PredictorConfig:
    preset: str = "iwm-equi"      # a key of iwm_fast.models.choices.PREDICTOR_PRESETS, or "";
    # the fields below replace the preset's value where set (0 or ""); preset "" needs them all
    depth: int = 0
    width: int = 0
    num_heads: int = 0            # 0: the encoder's head count, as in I-JEPA
    conditioning: str = ""        # one of CONDITIONINGS: feature (IWM), sequence, none (I-JEPA)
    target_mode: str = ""         # one of TARGET_MODES: union (IWM) or per_block (I-JEPA)

    def validate(self):
        _one_of("predictor.preset", self.preset, ("",) + tuple(PREDICTOR_PRESETS))
        for name in ("depth", "width", "num_heads"):
            _int_at_least(f"predictor.{name}", getattr(self, name), 0)
        _one_of("predictor.conditioning", self.conditioning, ("",) + CONDITIONINGS)
        _one_of("predictor.target_mode", self.target_mode, ("",) + TARGET_MODES)
        if self.preset:
            return
        for name in ("depth", "width"):
            if getattr(self, name) <= 0:
                _fail(f"predictor.{name}", "an integer >= 1 when predictor.preset is \"\" (no preset to take it "
                      "from)", getattr(self, name))
        for name in ("conditioning", "target_mode"):
            if not getattr(self, name):
                raise ConfigError(f"predictor.{name} must be set when predictor.preset is \"\" (no preset to "
                                  "take it from)")


@dataclass
class DataConfig:
    dataset: str = "digits"       # one of iwm_fast.data.choices.dataset_names(): digits (bundled), imagefolder, shards
    root: str = ""                # imagefolder: class subfolders of JPEG/PNG files; shards: .tar shards or a comma list
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    num_workers: int = 2
    decode: str = "cpu"           # one of DECODES: cpu (PIL in workers) or gpu (nvJPEG; else cpu with a note)
    max_image_pixels: int = 64_000_000  # larger images are skipped unread (decompression bombs); 0: no limit

    def validate(self):
        _one_of("data.dataset", self.dataset, dataset_names())
        _one_of("data.decode", self.decode, DECODES)
        _int_at_least("data.max_image_pixels", self.max_image_pixels, 0)
        _int_at_least("data.image_size", self.image_size, 1)
        _range_pair("data.crop_scale", self.crop_scale)
        _int_at_least("data.num_workers", self.num_workers, 0)


@dataclass
class MaskConfig:
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False

    def validate(self):
        _int_at_least("masks.num_targets", self.num_targets, 1)
        _range_pair("masks.target_scale", self.target_scale)
        _range_pair("masks.context_scale", self.context_scale)
        _range_pair("masks.target_aspect", self.target_aspect, high=math.inf)
        _int_at_least("masks.min_keep", self.min_keep, 0)


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
    precision: str = "auto"       # one of iwm_fast.train.choices.PRECISIONS (auto: bf16 on GPU, fp32 on CPU)
    compile: bool = False
    activation_checkpointing: bool = False
    loss: str = "l2"              # one of iwm_fast.models.choices.LOSSES: l2 (IWM) or smooth_l1 (I-JEPA's release)
    log_every: int = 10
    max_bad_steps: int = 5        # consecutive non-finite losses before the run stops
    device: str = "auto"          # one of iwm_fast.train.choices.DEVICES
    term_grace_s: float = 120.0   # after SIGTERM: seconds to reach a step boundary and save before exiting anyway

    def validate(self):
        for name in ("steps", "batch_size", "checkpoint_every", "accum_steps", "log_every", "max_bad_steps"):
            _int_at_least(f"train.{name}", getattr(self, name), 1)
        if not 0 <= self.seed < 2 ** 63:
            _fail("train.seed", "an integer in [0, 2**63)", self.seed)
        _int_at_least("train.keep_checkpoints", self.keep_checkpoints, 0)
        _int_at_least("train.warmup_steps", self.warmup_steps, 0)
        for name in ("lr", "start_lr", "final_lr", "grad_clip", "term_grace_s"):
            _finite_at_least(f"train.{name}", getattr(self, name))
        if not all(math.isfinite(v) and v >= 0 for v in self.weight_decay):
            _fail("train.weight_decay", "a pair [start, end] of finite numbers >= 0", list(self.weight_decay))
        _range_pair("train.ema_momentum", self.ema_momentum, low_open=False)
        _one_of("train.precision", self.precision, PRECISIONS)
        _one_of("train.loss", self.loss, LOSSES)
        _one_of("train.device", self.device, DEVICES)


@dataclass
class EvalConfig:
    enabled: bool = True
    bank_size: int = 256
    num_queries: int = 64
    probe_epochs: int = 100
    max_train_images: int = 2000

    def validate(self):
        _int_at_least("eval.bank_size", self.bank_size, 2)
        for name in ("num_queries", "probe_epochs", "max_train_images"):
            _int_at_least(f"eval.{name}", getattr(self, name), 1)


SECTIONS = ("model", "predictor", "data", "masks", "train", "eval")  # the sections with a validate() of ours


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

    def validate(self):
        """Check every value once, before anything is built or written; raises ConfigError naming the key and
        what it allows. (The data root, the device and the world size are the trainer's to check, in
        ``iwm_fast.train.environment``.) Returns the config."""
        for name in SECTIONS:
            getattr(self, name).validate()
        try:
            self.augment.validate()
        except ValueError as e:
            raise ConfigError(f"augment: {e}") from None
        m, p = self.model, self.predictor
        width = resolve_predictor(p)[1]
        heads = p.num_heads or VIT_SIZES[m.size].num_heads
        if width % heads:
            src = "predictor.num_heads" if p.num_heads else f"model.size={m.size}'s head count"
            raise ConfigError(f"predictor width {width} must be divisible by {src} ({heads})")
        if self.data.image_size % m.patch_size:
            raise ConfigError(f"data.image_size must be divisible by model.patch_size={m.patch_size}, "
                              f"got {self.data.image_size!r}")
        return self


# ---------------------------------------------------------------- dotted keys and their values

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


# ---------------------------------------------------------------- files

def _check_unique_keys(node, path, prefix="", seen=None, within=()):
    """A key given twice (``train:`` twice, or ``train: {steps: ..}`` and ``train.steps: ..``) is an error naming
    it and both lines: YAML loaders keep the last silently, which erases the first."""
    seen = {} if seen is None else seen
    if not isinstance(node, yaml.MappingNode) or id(node) in within:  # an alias may point back at its parent
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        dotted, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if dotted in seen:
            raise ConfigError(f"config file {path} gives {dotted!r} twice (lines {seen[dotted]} and {line}); "
                              "keep one")
        seen[dotted] = line
        _check_unique_keys(value_node, path, f"{dotted}.", seen, within + (id(node),))


def _parse_yaml(text, path):
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


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
        data = _parse_yaml(text, path)
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
    """Defaults, then the YAML file at ``path``, then the overrides; every value checked by ``Config.validate``."""
    return from_dict(_read_yaml(path) if path is not None else {}, overrides, validate_values=validate_values)


def from_dict(data, overrides=(), *, validate_values=True):
    """A config from a nested dict (``to_dict``'s form, as saved with a run or a world model), then overrides."""
    cfg = Config()
    for key, value in _flatten(data):
        _set(cfg, key, value)
    apply_overrides(cfg, overrides)
    return cfg.validate() if validate_values else cfg


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
