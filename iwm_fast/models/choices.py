"""The models' named choices: encoder sizes, predictor presets and options, losses.

Plain Python without torch, so that the run config checks its values against these very tuples without building
or importing a model.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


VIT_SIZES = {
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
    "huge": ViTSize(1280, 32, 16),
    "giant": ViTSize(1408, 40, 16, 48 / 11),
}

CONDITIONINGS = ("feature", "sequence", "none")
TARGET_MODES = ("union", "per_block")
LOSSES = ("l2", "smooth_l1")  # l2: IWM's squared error; smooth_l1: I-JEPA's released choice


@dataclass(frozen=True)
class PredictorPreset:
    depth: int
    width: int
    conditioning: str
    target_mode: str


PREDICTOR_PRESETS = {
    "iwm-inv": PredictorPreset(12, 384, "feature", "union"),   # weak predictor: invariant features
    "iwm-equi": PredictorPreset(18, 384, "feature", "union"),  # strong predictor: equivariant features
    "ijepa": PredictorPreset(12, 384, "none", "per_block"),
}


def vit_size(name):
    try:
        return VIT_SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(VIT_SIZES)}") from None


def predictor_preset(name):
    try:
        return PREDICTOR_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown predictor preset {name!r}; choose one of {sorted(PREDICTOR_PRESETS)}") from None


def resolve_predictor(p):
    """(depth, width, conditioning, target_mode) of a ``predictor`` config section: its preset's values, each
    replaced by the section's own where that is set (0 or "" means the preset's)."""
    if p.preset:
        base = predictor_preset(p.preset)
        return (p.depth or base.depth, p.width or base.width, p.conditioning or base.conditioning,
                p.target_mode or base.target_mode)
    return p.depth, p.width, p.conditioning or "feature", p.target_mode or "union"
