"""How many directions a set of features uses: RankMe and the spread of the l2-normalised features.

RankMe (Garrido et al., 2023) is exp of the entropy of the singular values normalised to sum 1 (plus a small
epsilon): from 1, when every row points the same way (a collapsed representation), to min(rows, dim).
"""
import torch
import torch.nn.functional as F

EPS = 1e-7  # RankMe's epsilon, added to the normalised singular values


def rankme(features):
    """RankMe of ``features`` [N, D] as a 0-d float64 tensor on their device (1 for all-zero features)."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + EPS
    return torch.exp(-(p * p.log()).sum())


def normalized_std(features):
    """Mean over dimensions of the population std over rows of the l2-normalised ``features`` [N, D], a 0-d
    float64 tensor: 0 when every row points the same way, at most 1/sqrt(D)."""
    return F.normalize(features.double(), dim=1).std(dim=0, correction=0).mean()
