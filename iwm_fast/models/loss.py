"""JEPA regression loss between predictions and stop-gradient targets."""
import torch.nn.functional as F

from .choices import LOSSES


def jepa_loss(pred, target, kind="l2"):
    """Mean over all elements. ``l2`` is IWM's squared error; ``smooth_l1`` is I-JEPA's released choice."""
    target = target.detach()
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float())
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred.float(), target.float())
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
