"""IWM's downstream protocols on a pretrained run: fine-tune the predictor (frozen encoder), the encoder, or probe."""
from .run import PREDICTOR_INITS, PROTOCOLS, FinetuneArgs, finetune, run_finetune

__all__ = ["FinetuneArgs", "finetune", "run_finetune", "PROTOCOLS", "PREDICTOR_INITS"]
