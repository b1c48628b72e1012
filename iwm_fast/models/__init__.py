"""Models of the IWM method: ViT encoders, the conditioned predictor and the IWM wrapper."""
from .factory import build_iwm, resolve_predictor
from .iwm import IWM
from .loss import jepa_loss
from .predictor import PREDICTOR_PRESETS, IWMPredictor, PredictorPreset, predictor_preset
from .vit import (VIT_SIZES, VisionTransformer, ViTSize, build_vit, vit_base, vit_giant, vit_huge, vit_large,
                  vit_size, vit_small, vit_tiny)

__all__ = ["VisionTransformer", "IWMPredictor", "IWM", "vit_tiny", "vit_small", "vit_base", "vit_large",
           "vit_huge", "vit_giant", "build_vit", "vit_size", "VIT_SIZES", "ViTSize", "PREDICTOR_PRESETS",
           "PredictorPreset", "predictor_preset", "jepa_loss", "build_iwm", "resolve_predictor"]
