"""EMA update of a target network. Placeholder in plain PyTorch; the fused kernel lands with the EMA issue."""
import torch


def ema_update_(target, online, momentum):
    """target <- m * target + (1 - m) * online, for modules or parameter lists."""
    t = list(target.parameters()) if isinstance(target, torch.nn.Module) else list(target)
    o = list(online.parameters()) if isinstance(online, torch.nn.Module) else list(online)
    with torch.no_grad():
        torch._foreach_lerp_([p.data for p in t], [p.data for p in o], 1.0 - float(momentum))
