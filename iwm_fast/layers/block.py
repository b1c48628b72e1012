"""Pre-norm transformer block and MLP with I-JEPA's parameter names (norm1, attn, norm2, mlp.fc1, mlp.fc2)."""
import torch.nn as nn

from .attention import Attention

LN_EPS = 1e-6


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, key_lengths=None):
        x = x + self.attn(self.norm1(x), key_lengths=key_lengths)
        return x + self.mlp(self.norm2(x))
