"""One training step of IWM: inputs (views, masks), loss, backward, AdamW, EMA.

The engine's loop and the end-to-end benchmark both run exactly these two functions. Neither reads a value back
to the host: the loss and its finiteness stay on the device (the loop reads them at log steps), and a
non-finite loss skips the AdamW and EMA updates on the device (fused AdamW's ``found_inf``, an EMA momentum of 1).
"""
import contextlib
import dataclasses

import torch
import torch.distributed as dist

from .. import ops
from ..backends import FUSED
from ..masks import sample_block_masks
from ..transforms import action_vector, apply, normalize, sample_params, to_float


@dataclasses.dataclass
class StepInputs:
    source: torch.Tensor     # masked view's pixels (normalised), [B, 3, H, W]
    target: torch.Tensor     # target view's pixels (normalised), [B, 3, H, W]
    ctx_idx: torch.Tensor    # [B, Nc]
    tgt_idx: torch.Tensor    # [B, M, Nt]
    action: torch.Tensor     # [B, ACTION_DIM]


class NoTimer:
    """The phase-timer hook's default: marks cost nothing (the benchmark passes a real one)."""
    enabled = False

    def mark(self, name):
        pass


NO_TIMER = NoTimer()


@contextlib.contextmanager
def model_phases(model, timer):
    """Marks the model's phases on ``timer`` from module and gradient hooks, so the model knows nothing of timing.

    ``target_encoder`` ends where the context encoder's forward starts, ``context_fwd`` where it returns,
    ``predictor_fwd`` (the predictor and the loss) where the model's forward returns, and ``predictor_bwd`` when the
    backward reaches the context tokens. The hooks are removed on exit; a disabled timer installs none."""
    if not timer.enabled:
        yield
        return

    def context_done(module, args, tokens):
        timer.mark("context_fwd")
        if tokens.requires_grad:
            tokens.register_hook(lambda grad: timer.mark("predictor_bwd"))

    # Prepended, so the mark precedes other pre-hooks of the encoder (FSDP's all-gather): as before its call.
    handles = [model.encoder.register_forward_pre_hook(lambda module, args: timer.mark("target_encoder"),
                                                       prepend=True),
               model.encoder.register_forward_hook(context_done),
               model.register_forward_hook(lambda module, args, loss: timer.mark("predictor_fwd"))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def sample_masks(global_batch, grid, m, *, seed, step, device, backend):
    """(context [B, Nc], targets [B, M, Nt]) of the whole global batch, from (seed, step), by the mask sampler
    ``backend`` (``iwm_fast.backends.MASKS``).

    ``cuda`` samples on the training device, whose op reads the batch's token counts back (one host sync); every
    other backend samples on the host, for the caller to slice and copy asynchronously."""
    return sample_block_masks(global_batch, grid, num_targets=m.num_targets, target_scale=m.target_scale,
                              target_aspect=m.target_aspect, context_scale=m.context_scale, min_keep=m.min_keep,
                              allow_overlap=m.allow_overlap, seed=seed, step=step,
                              device=device if backend == "cuda" else "cpu", backend=backend)


def make_inputs(images, *, rows, global_batch, grid, mask_config, augment, seed, step, device, backends=FUSED,
                masks=None):
    """Build one micro-batch on ``device`` from crop-and-flipped images (uint8 or float in [0, 1]).

    Masks (``mask_config``: the config's ``masks`` section) and view parameters (``augment``: its
    ``TransformConfig``) are drawn for the whole global batch from (seed, step) and sliced by ``rows`` (this rank's
    positions in it, a CPU tensor), so every sample gets the same views and masks whatever the world size.
    ``masks`` passes the global batch's (context, targets) sampled elsewhere.
    """
    device = torch.device(device)
    images = images.to(device, non_blocking=True)
    images = to_float(images)
    if masks is None:
        masks = sample_masks(global_batch, grid, mask_config, seed=seed, step=step, device=device,
                             backend=backends.masks)
    ctx, tgt = masks
    rows = rows.to(ctx.device)
    # Host to device without a sync: a non-blocking copy from pageable memory is staged at once and never waits
    # for the device.
    ctx, tgt = ctx[rows].to(device, non_blocking=True), tgt[rows].to(device, non_blocking=True)
    params = sample_params(global_batch, cfg=augment, seed=seed, step=step, device="cpu")[rows.cpu()]
    params = params.to(device, non_blocking=True)
    # The views' range check reads the images back (a host sync); crops from our loader are in range.
    return StepInputs(source=normalize(apply(images, params, "source", check_range=False)),
                      target=normalize(apply(images, params, "target", check_range=False)),
                      ctx_idx=ctx, tgt_idx=tgt, action=action_vector(params))


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


def train_step(model, optimizer, micro_batches, *, lr, wd, momentum, grad_clip=0.0, scaler=None, backends=FUSED,
               loss_hook=None, step=0, timer=NO_TIMER):
    """Forward/backward over the micro-batches, then AdamW and the EMA update of the target encoder.

    Returns ``(loss, finite)``, 0-d device tensors: the loss averaged over micro-batches and ranks, and whether it
    is finite. A non-finite loss leaves every parameter, the optimizer state and the target encoder as they were,
    on every rank, without a host read. ``timer.mark(phase)`` is called between phases (``iwm_fast.bench.e2e``);
    the model's own phases are marked by hooks (``model_phases``).
    """
    set_optimizer_schedule(optimizer, lr, wd)
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = None
    for i, mb in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == n - 1)  # reduce-scatter once, after the last micro-batch
        with model_phases(model, timer):
            loss = model(mb.source, mb.target, mb.ctx_idx, mb.tgt_idx, mb.action)
        if loss_hook is not None:
            loss = loss_hook(step, loss)
        scaled = loss / n
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        timer.mark("context_bwd")
        total = loss.detach() if total is None else total + loss.detach()
    mean = _mean_over_ranks(total / n)
    finite = torch.isfinite(mean)
    if scaler is not None:  # fp16: the grad scaler skips steps with non-finite gradients itself
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.found_inf = (~finite).float()  # fused AdamW leaves parameters and state untouched where 1
        optimizer.step()
    timer.mark("optimizer")
    # A skipped step must not move the target either: momentum 1 keeps it exactly (the online weights are
    # finite, since AdamW did not update them).
    m = torch.where(finite, torch.full_like(mean, momentum, dtype=torch.float32), 1.0)
    ops.ema_update_(model.target_encoder, model.encoder, m, backend=backends.ema)
    timer.mark("ema")
    return mean, finite


def build_optimizer(model, *, lr):
    """Fused AdamW (CPU and CUDA) without weight decay on biases, norms and 1-d parameters (as I-JEPA).

    Fused, because its ``found_inf`` input is how a non-finite step is skipped without reading the loss back."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)
