"""Patch other JEPA codebases (I-JEPA, V-JEPA, timm ViTs) with iwm-fast's fused layers, and undo it."""
from .attention import PatchedAttention
from .model import patch_model, unpatch_model
from .report import ModuleDecision, PatchReport
from .rope import PatchedACRoPEAttention, PatchedRoPEAttention

__all__ = ["patch_model", "unpatch_model", "PatchReport", "ModuleDecision", "PatchedAttention",
           "PatchedRoPEAttention", "PatchedACRoPEAttention"]
