"""Fixed 2-D sine-cosine positional embeddings (no class token), laid out as in I-JEPA."""
import torch


def sincos_1d(dim, positions):
    """[len(positions), dim]: sines of positions * omega_i in the first half, cosines in the second."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, grid):
    """[H*W, dim] for a grid of (H, W) patches, row-major (token h*W + w).

    The first half of the channels encodes the column and the second half the row, the order I-JEPA's
    public checkpoints were trained with.
    """
    H, W = grid
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows = torch.arange(H).repeat_interleave(W)
    cols = torch.arange(W).repeat(H)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()
