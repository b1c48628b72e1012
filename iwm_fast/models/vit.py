"""Vision Transformer encoder with I-JEPA's parameter names, so its public checkpoints load with strict=True."""
import torch
import torch.nn as nn

from ..layers.block import LN_EPS, Block
from ..ops.gather import apply_masks
from .choices import vit_size
from .pos_embed import sincos_2d


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class VisionTransformer(nn.Module):
    """Pre-norm ViT without class token. ``forward(x, masks)`` keeps only the tokens named by ``masks``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, init_std=0.02, attn_backend="auto", patch_init_std=None,
                 gather_backend="auto"):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = int(patch_size)
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"image size {self.img_size} is not divisible by the patch size {self.patch_size}")
        self.grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.gather_backend = gather_backend
        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim)
        # A parameter (not a buffer) so that it sits in the state dict as in I-JEPA; it is never trained.
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, attn_backend) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.init_std = init_std
        self.patch_init_std = patch_init_std
        self.apply(self._init_weights)
        for i, block in enumerate(self.blocks):  # depth-scaled output projections, as in I-JEPA
            block.attn.proj.weight.data.div_((2.0 * (i + 1)) ** 0.5)
            block.mlp.fc2.weight.data.div_((2.0 * (i + 1)) ** 0.5)
        if patch_init_std is not None:
            # I-JEPA's std 0.02 scales patch tokens with sqrt(3 p^2): small patches start with tokens mostly
            # position and little content. A larger std restores the content share of a patch-16 model.
            if patch_init_std <= 0:
                raise ValueError(f"patch_init_std must be positive, got {patch_init_std}")
            nn.init.trunc_normal_(self.patch_embed.proj.weight, std=patch_init_std)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=self.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def check_images(self, x):
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"images have {x.shape[1]} channels, the encoder expects {self.in_chans}")
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"images are {tuple(x.shape[2:])} pixels, the encoder was built for {self.img_size}")

    def forward(self, x, masks=None):
        self.check_images(x)
        x = self.patch_embed(x)
        pos = self.pos_embed[0].to(x.dtype)
        if masks is None:
            x = x + pos
        else:
            # Keep the visible tokens and add their positions in one fused gather.
            x = apply_masks(x, masks, pos=pos, backend=self.gather_backend)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build_vit(size="base", **kwargs):
    s = vit_size(size)
    kwargs.setdefault("mlp_ratio", s.mlp_ratio)
    kwargs.setdefault("depth", s.depth)
    return VisionTransformer(embed_dim=s.embed_dim, num_heads=s.num_heads, **kwargs)


def vit_tiny(**kw):
    return build_vit("tiny", **kw)


def vit_small(**kw):
    return build_vit("small", **kw)


def vit_base(**kw):
    return build_vit("base", **kw)


def vit_large(**kw):
    return build_vit("large", **kw)


def vit_huge(**kw):
    return build_vit("huge", **kw)


def vit_giant(**kw):
    return build_vit("giant", **kw)
