"""Models of the IWM method: ViT encoders, the conditioned predictor and the IWM wrapper.

Names are imported on first use, so that ``choices`` (sizes, presets, options) is light to import.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "build_iwm": "factory", "resolve_predictor": "choices", "IWM": "iwm", "jepa_loss": "loss",
    "IWMPredictor": "predictor", "PREDICTOR_PRESETS": "choices", "PredictorPreset": "choices",
    "predictor_preset": "choices", "VIT_SIZES": "choices", "ViTSize": "choices", "vit_size": "choices",
    **dict.fromkeys(("VisionTransformer", "build_vit", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge",
                     "vit_giant"), "vit"),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
