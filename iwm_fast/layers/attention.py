"""Multi-head self-attention layer, parameter-compatible with I-JEPA and timm (``qkv`` and ``proj``)."""
import torch.nn as nn

from ..ops.attention import attention_qkv


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True, proj_bias=True, backend="auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x, key_lengths=None):
        B, N, C = x.shape
        # The packed projection goes to the op whole: the Triton backward writes its gradient in this layout.
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        out = attention_qkv(qkv, scale=self.scale, key_lengths=key_lengths, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
