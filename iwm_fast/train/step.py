"""One training step of IWM: views, masks, loss, backward, AdamW, EMA."""
import dataclasses
import math

import torch
import torch.distributed as dist

from .. import ops
from ..masks import sample_block_masks
from ..transforms import action_vector, apply, normalize, sample_params


@dataclasses.dataclass
class StepInputs:
    source: torch.Tensor     # masked view's pixels (normalised), [B, 3, H, W]
    target: torch.Tensor     # target view's pixels (normalised), [B, 3, H, W]
    ctx_idx: torch.Tensor    # [B, Nc]
    tgt_idx: torch.Tensor    # [B, M, Nt]
    action: torch.Tensor     # [B, ACTION_DIM]


def make_inputs(images, *, rows, global_batch, grid, cfg, seed, step, device):
    """Build one micro-batch on ``device`` from crop-and-flipped images (uint8 or float in [0, 1]).

    Masks and transformation parameters are drawn for the whole global batch from (seed, step) and sliced by
    ``rows`` (this rank's positions in it), so every sample gets the same views and masks whatever the world size.
    """
    images = images.to(device, non_blocking=True)
    images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    m = cfg.masks
    ctx, tgt = sample_block_masks(global_batch, grid, num_targets=m.num_targets, target_scale=m.target_scale,
                                  target_aspect=m.target_aspect, context_scale=m.context_scale,
                                  min_keep=m.min_keep, allow_overlap=m.allow_overlap, seed=seed, step=step,
                                  device=device)
    params = sample_params(global_batch, cfg=cfg.augment, seed=seed, step=step, device=device)[rows]
    return StepInputs(source=normalize(apply(images, params, "source")),
                      target=normalize(apply(images, params, "target")),
                      ctx_idx=ctx[rows], tgt_idx=tgt[rows], action=action_vector(params))


def set_optimizer_schedule(optimizer, lr, wd):
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decay", True):
            group["weight_decay"] = wd


def _mean_over_ranks(value):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":  # gloo has no AVG
            value /= dist.get_world_size()
    return value


def train_step(model, optimizer, micro_batches, *, lr, wd, momentum, grad_clip=0.0, scaler=None,
               loss_hook=None, step=0):
    """Forward/backward over the micro-batches, then AdamW and the EMA update of the target encoder.

    Returns ``(loss, skipped)``: ``loss`` is averaged over micro-batches and ranks; a non-finite loss skips the
    optimizer and EMA updates on every rank (``skipped`` is True).
    """
    set_optimizer_schedule(optimizer, lr, wd)
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = None
    for i, mb in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == n - 1)  # reduce-scatter once, after the last micro-batch
        loss = model(mb.source, mb.target, mb.ctx_idx, mb.tgt_idx, mb.action)
        if loss_hook is not None:
            loss = loss_hook(step, loss)
        scaled = loss / n
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total = loss.detach() if total is None else total + loss.detach()
    mean = _mean_over_ranks(total / n).item()
    if not math.isfinite(mean):
        optimizer.zero_grad(set_to_none=True)
        return mean, True
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    ops.ema_update_(model.target_encoder, model.encoder, momentum)
    return mean, False


def build_optimizer(model, *, lr, device):
    """AdamW without weight decay on biases, norms and 1-d parameters (as I-JEPA); fused on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)
