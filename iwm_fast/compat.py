"""Drop-in helpers with the signatures I-JEPA and V-JEPA training scripts call, backed by iwm-fast's fused ops.

- ``apply_masks(x, masks, concat=True)``: I-JEPA's ``apply_masks(x, masks)`` (and V-JEPA's ``concat`` flag).
- ``ema_update_model(target_encoder, encoder, m)``: the whole target-encoder momentum update in one call.
- ``MultiBlockMaskCollator``: the I-JEPA multi-block mask collator (official constructor arguments).
"""
import torch

from . import ops

__all__ = ["apply_masks", "ema_update_model", "MultiBlockMaskCollator"]  # noqa: F822 (lazy, __getattr__)


def _mask_list(masks):
    if torch.is_tensor(masks):
        return [masks]
    masks = list(masks)
    if not masks:
        raise ValueError("apply_masks needs at least one mask")
    for i, m in enumerate(masks):
        if not torch.is_tensor(m) or m.dim() != 2 or m.dtype.is_floating_point or m.dtype == torch.bool:
            raise TypeError(f"mask {i} must be an integer index tensor of shape [B, K], got "
                            f"{type(m).__name__}{tuple(m.shape) if torch.is_tensor(m) else ''}"
                            f"{' ' + str(m.dtype) if torch.is_tensor(m) else ''}")
    return masks


def apply_masks(x, masks, concat=True):
    """Keep the tokens named by each [B, K] index mask of ``x`` [B, N, D].

    ``concat=True`` returns the gathers stacked along the batch, [len(masks) * B, K, D], mask-major as in
    I-JEPA; ``concat=False`` returns the list of [B, K, D] gathers (V-JEPA's option).
    """
    if not torch.is_tensor(x) or x.dim() != 3:
        raise TypeError(f"x must be a [B, N, D] tensor, got {type(x).__name__}"
                        f"{tuple(x.shape) if torch.is_tensor(x) else ''}")
    masks = _mask_list(masks)
    for i, m in enumerate(masks):
        if m.shape[0] != x.shape[0]:
            raise ValueError(f"mask {i} has batch {m.shape[0]} but x has batch {x.shape[0]}")
    if concat:
        return ops.apply_masks(x, masks)
    return [ops.apply_masks(x, [m]) for m in masks]


def _params(model, role):
    if isinstance(model, torch.nn.Module):
        return list(model.parameters())
    params = list(model)
    if not all(torch.is_tensor(p) for p in params):
        raise TypeError(f"{role} must be an nn.Module or an iterable of tensors")
    return params


def ema_update_model(target_encoder, encoder, m):
    """target <- m * target + (1 - m) * online for every parameter pair, like I-JEPA's momentum update.

    Pairs parameters in ``parameters()`` order, as I-JEPA's zip does, so DDP- or compile-wrapped models work;
    unlike zip it refuses models whose parameter counts or shapes differ. Buffers are not touched (as in
    I-JEPA). ``m`` is a float or a 0-d float tensor in [0, 1]; a CUDA tensor is passed to the fused kernel
    unread (no host sync), so its range is the caller's to keep.
    """
    if torch.is_tensor(m):
        if m.dim() != 0 or not m.dtype.is_floating_point:
            raise ValueError(f"momentum tensor must be a 0-d float tensor, got shape {tuple(m.shape)} {m.dtype}")
        if m.device.type == "cpu":
            m = float(m)
        # A device tensor goes to the kernel unread: reading it to check its range would sync every step.
    if not torch.is_tensor(m) and (not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {m!r}")
    target, online = _params(target_encoder, "target_encoder"), _params(encoder, "encoder")
    if len(target) != len(online):
        raise ValueError(f"target_encoder has {len(target)} parameters but encoder has {len(online)}")
    for i, (t, o) in enumerate(zip(target, online)):
        if t.shape != o.shape:
            raise ValueError(f"parameter {i}: target shape {tuple(t.shape)} != encoder shape {tuple(o.shape)}")
    ops.ema_update_(target, online, m)


def __getattr__(name):
    # Imported lazily so that compat does not pull in the mask sampler (and its deps) until it is asked for.
    if name == "MultiBlockMaskCollator":
        from .masks import MultiBlockMaskCollator
        return MultiBlockMaskCollator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
