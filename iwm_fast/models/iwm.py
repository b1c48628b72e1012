"""The IWM model: context encoder, EMA target encoder and conditioned predictor, returning the loss."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.gather import apply_masks, masked_gather
from .loss import jepa_loss
from .predictor import as_context_tensor, as_target_tensor


class IWM(nn.Module):
    """``forward(source, target, ctx_idx, tgt_idx, action)`` returns the scalar loss.

    The target encoder is a frozen copy of the context encoder, updated only by the EMA
    (``iwm_fast.ops.ema_update_``); it never receives gradients.
    """

    def __init__(self, encoder, predictor, loss="l2"):
        super().__init__()
        self.encoder = encoder
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.predictor = predictor
        self.loss_kind = loss
        self._flops = {}  # (context tokens, blocks, tokens per block) -> flops_per_image
        self._linear_weights = None  # (target encoder, encoder, predictor): counted at the first flops_per_image

    @torch.no_grad()
    def targets(self, target_images, tgt_idx):
        h = self.target_encoder(target_images)
        h = F.layer_norm(h, (h.shape[-1],))
        tgt = as_target_tensor(tgt_idx)
        B, M, Nt = tgt.shape
        if self.predictor.target_mode == "per_block":
            # [M, B, Nt]: block-major rows
            return apply_masks(h, tgt.transpose(0, 1), backend=self.predictor.gather_backend)
        return masked_gather(h, tgt.reshape(B, M * Nt), backend=self.predictor.gather_backend)

    def predict(self, source_images, ctx_idx, tgt_idx, action=None):
        ctx_idx = as_context_tensor(ctx_idx)
        z = self.encoder(source_images, ctx_idx)
        return self.predictor(z, ctx_idx, tgt_idx, action)

    def flops_per_image(self, ctx_tokens, tgt_shape):
        """Approximate training FLOPs of one image in a step with ``ctx_tokens`` context tokens and ``tgt_shape``
        = (blocks, tokens per block) targets: forward and backward (3x the forward) of the context encoder and
        the predictor, the forward of the target encoder. A forward costs 2 FLOPs per Linear weight per token
        plus ``4 * L**2 * D`` per attention layer over L tokens (scores and values). Cached per shape."""
        key = (ctx_tokens, *tgt_shape)
        if key not in self._flops:
            blocks, per_block = tgt_shape
            if self.predictor.target_mode == "per_block":  # one predictor sequence per block
                sequences, length = blocks, ctx_tokens + per_block
            else:
                sequences, length = 1, ctx_tokens + blocks * per_block
            if self._linear_weights is None:
                self._linear_weights = tuple(_linear_weights(m) for m in (self.target_encoder, self.encoder,
                                                                          self.predictor))
            w_target, w_context, w_predictor = self._linear_weights
            enc, pred = self.encoder, self.predictor
            depth, dim = len(enc.blocks), enc.embed_dim
            target = _forward_flops(w_target, depth, dim, 1, enc.num_patches)
            context = _forward_flops(w_context, depth, dim, 1, ctx_tokens)
            predictor = _forward_flops(w_predictor, len(pred.predictor_blocks), pred.predictor_embed.out_features,
                                       sequences, length)
            self._flops[key] = target + 3 * (context + predictor)
        return self._flops[key]

    def forward(self, source, target, ctx_idx, tgt_idx, action=None):
        """The loss of predicting the target view's latents at ``tgt_idx`` from the source view's ``ctx_idx``."""
        h = self.targets(target, tgt_idx)
        return jepa_loss(self.predict(source, ctx_idx, tgt_idx, action), h, self.loss_kind)


def _linear_weights(module):
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _forward_flops(linear_weights, depth, dim, sequences, length):
    """Forward FLOPs over ``sequences`` sequences of ``length`` tokens (integers: exact)."""
    return 2 * linear_weights * sequences * length + depth * 4 * sequences * length ** 2 * dim
