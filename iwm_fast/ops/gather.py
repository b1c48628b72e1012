"""Masked-token gather. Placeholder in plain PyTorch; the Triton kernel lands with the gather issue."""
import torch


def masked_gather(x, idx, pos=None):
    """out[b, k] = x[b, idx[b, k]] (+ pos[idx[b, k]]). x: [B, N, D], idx: [B, K] -> [B, K, D]."""
    out = torch.gather(x, 1, idx.long()[..., None].expand(-1, -1, x.shape[-1]))
    if pos is not None:
        p = pos if pos.dim() == 3 else pos[None]
        p = p.expand(x.shape[0], -1, -1)
        out = out + torch.gather(p, 1, idx.long()[..., None].expand(-1, -1, x.shape[-1]))
    return out


def apply_masks(x, masks, pos=None):
    """I-JEPA's helper: gather each [B, K] mask and concatenate the results along the batch dimension."""
    if torch.is_tensor(masks):
        masks = [masks]
    return torch.cat([masked_gather(x, m, pos) for m in masks], dim=0)
