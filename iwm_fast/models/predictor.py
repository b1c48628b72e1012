"""Transformation-conditioned latent predictor g_phi (IWM), with I-JEPA's parameter names.

With ``conditioning="none"`` and ``target_mode="per_block"`` it is exactly I-JEPA's predictor.
"""
import torch
import torch.nn as nn

from ..layers.block import LN_EPS, Block
from ..ops.gather import apply_masks, masked_gather
from .choices import CONDITIONINGS, TARGET_MODES
from .pos_embed import sincos_2d

def as_target_tensor(targets):
    """Target positions as one [B, M, Nt] tensor; accepts I-JEPA's list of M [B, Nt] tensors too."""
    if isinstance(targets, (list, tuple)):
        if not targets:
            raise ValueError("no target masks given")
        targets = torch.stack(list(targets), dim=1)
    if targets.dim() == 2:
        targets = targets[:, None]
    if targets.dim() != 3:
        raise ValueError(f"target indices must be [B, M, Nt], got shape {tuple(targets.shape)}")
    return targets


def as_context_tensor(context):
    """Context positions as one [B, Nc] tensor; accepts a one-element list (I-JEPA's nenc=1)."""
    if isinstance(context, (list, tuple)):
        if len(context) != 1:
            raise ValueError(f"exactly one context mask per sample is supported, got {len(context)}")
        context = context[0]
    if context.dim() != 2:
        raise ValueError(f"context indices must be [B, Nc], got shape {tuple(context.shape)}")
    return context


class IWMPredictor(nn.Module):
    """Predicts target-encoder features at target positions from context tokens and an action vector.

    Output: ``[M*B, Nt, D]`` (block-major, as I-JEPA's ``apply_masks``) for ``target_mode="per_block"``,
    ``[B, M*Nt, D]`` for ``target_mode="union"``.
    """

    def __init__(self, grid, embed_dim=768, predictor_embed_dim=384, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, conditioning="feature", action_dim=0, num_action_tokens=1,
                 target_mode="union", init_std=0.02, attn_backend="auto", gather_backend="auto"):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; choose one of {CONDITIONINGS}")
        if target_mode not in TARGET_MODES:
            raise ValueError(f"unknown target_mode {target_mode!r}; choose one of {TARGET_MODES}")
        if conditioning != "none" and action_dim <= 0:
            raise ValueError(f"conditioning {conditioning!r} needs action_dim > 0")
        self.grid = tuple(grid)
        self.conditioning = conditioning
        self.target_mode = target_mode
        self.action_dim = action_dim
        self.gather_backend = gather_backend
        D = predictor_embed_dim
        self.predictor_embed = nn.Linear(embed_dim, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(D, self.grid)[None], requires_grad=False)
        if conditioning == "feature":
            # The action is concatenated to each position-augmented mask token and mixed by a 3-layer MLP, whose
            # output is added to the token (see _init_conditioning).
            self.action_mlp = nn.Sequential(nn.Linear(D + action_dim, D), nn.GELU(), nn.Linear(D, D), nn.GELU(),
                                            nn.Linear(D, D))
        elif conditioning == "sequence":
            self.num_action_tokens = num_action_tokens
            self.action_proj = nn.Linear(action_dim, D * num_action_tokens)
        self.predictor_blocks = nn.ModuleList(
            [Block(D, num_heads, mlp_ratio, qkv_bias, attn_backend) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.predictor_proj = nn.Linear(D, embed_dim)
        self.init_std = init_std
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        self.apply(self._init_weights)
        for i, block in enumerate(self.predictor_blocks):
            block.attn.proj.weight.data.div_((2.0 * (i + 1)) ** 0.5)
            block.mlp.fc2.weight.data.div_((2.0 * (i + 1)) ** 0.5)
        self._init_conditioning()

    @torch.no_grad()
    def _init_conditioning(self):
        """Conditioning layers get fan-in initialisation instead of the blocks' std 0.02.

        Three std-0.02 layers in a row would shrink the mask tokens about 1000-fold, erasing their positions
        and starving the action weights of gradient: measured on the CPU demo, a predictor initialised that
        way had not started to use the action after 250 steps, even against a frozen target encoder. Here the
        MLP's hidden layers keep their input's scale and its last layer starts at zero, so at initialisation
        the mask tokens are exactly I-JEPA's (mask_token + pos) and the MLP learns the action's residual.
        """
        if self.conditioning == "feature":
            for layer in list(self.action_mlp)[:-1]:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
                    nn.init.zeros_(layer.bias)
            nn.init.zeros_(self.action_mlp[-1].weight)
            nn.init.zeros_(self.action_mlp[-1].bias)
        elif self.conditioning == "sequence":
            nn.init.normal_(self.action_proj.weight, std=self.action_dim ** -0.5)
            nn.init.zeros_(self.action_proj.bias)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=self.init_std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, ctx, ctx_idx, tgt_idx, action=None):
        ctx_idx = as_context_tensor(ctx_idx)
        tgt = as_target_tensor(tgt_idx)
        B, M, Nt = tgt.shape
        if ctx.shape[0] != B or ctx_idx.shape != ctx.shape[:2]:
            raise ValueError(f"context tokens {tuple(ctx.shape)} do not match context indices "
                             f"{tuple(ctx_idx.shape)} and {B} target rows")
        if self.conditioning != "none":
            if action is None:
                raise ValueError(f"conditioning {self.conditioning!r} needs an action vector")
            if action.shape != (B, self.action_dim):
                raise ValueError(f"action must be [{B}, {self.action_dim}], got {tuple(action.shape)}")
        x = self.predictor_embed(ctx)
        pos = self.predictor_pos_embed[0].to(x.dtype)
        N, D = pos.shape
        x = x + masked_gather(pos[None].expand(B, N, D), ctx_idx, backend=self.gather_backend)
        # Mask tokens: mask_token + pos[idx], built in one fused gather.
        base = self.mask_token.to(x.dtype).expand(B, N, D)
        if self.target_mode == "per_block":
            tokens = apply_masks(base, tgt.transpose(0, 1), pos=pos, backend=self.gather_backend)  # [M*B, Nt, D]
            x = x.repeat(M, 1, 1)
            action = action.repeat(M, 1) if action is not None else None
        else:
            tokens = masked_gather(base, tgt.reshape(B, M * Nt), pos=pos, backend=self.gather_backend)  # [B, M*Nt, D]
        T = tokens.shape[1]
        if self.conditioning == "feature":
            a = action.to(tokens.dtype)[:, None, :].expand(-1, T, -1)
            tokens = tokens + self.action_mlp(torch.cat([tokens, a], dim=-1))
        elif self.conditioning == "sequence":
            a = self.action_proj(action.to(x.dtype)).view(x.shape[0], self.num_action_tokens, D)
            x = torch.cat([x, a], dim=1)
        x = torch.cat([x, tokens], dim=1)
        for block in self.predictor_blocks:
            x = block(x)
        x = self.predictor_norm(x[:, -T:])
        return self.predictor_proj(x)
