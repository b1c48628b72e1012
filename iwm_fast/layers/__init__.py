"""Drop-in layers built on iwm-fast's ops."""
from .attention import Attention
from .block import LN_EPS, Block, Mlp

__all__ = ["Attention", "Block", "Mlp", "LN_EPS"]
