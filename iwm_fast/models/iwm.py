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

    def forward(self, source, target, ctx_idx, tgt_idx, action=None, timer=None):
        """The loss. ``timer.mark(phase)`` (the benchmark's phase timer) is called after each phase; a hook on
        the context tokens marks where the backward leaves the predictor for the context encoder."""
        h = self.targets(target, tgt_idx)
        if timer is None or not timer.enabled:
            return jepa_loss(self.predict(source, ctx_idx, tgt_idx, action), h, self.loss_kind)
        timer.mark("target_encoder")
        ctx_idx = as_context_tensor(ctx_idx)
        z = self.encoder(source, ctx_idx)
        timer.mark("context_fwd")
        if z.requires_grad:
            z.register_hook(lambda grad: timer.mark("predictor_bwd"))
        loss = jepa_loss(self.predictor(z, ctx_idx, tgt_idx, action), h, self.loss_kind)
        timer.mark("predictor_fwd")
        return loss
