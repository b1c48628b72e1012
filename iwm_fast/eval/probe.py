"""Linear probe on frozen, standardised features, trained full-batch with L-BFGS (deterministic)."""
import contextlib
from dataclasses import dataclass
from typing import Union
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .features import extract_features
from .progress import progress_bar
from .rank import rankme

DEFAULT_WD_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
# Below this many feature values a CPU fit runs on one thread: each L-BFGS evaluation is then a few tens of
# microseconds, and intra-op thread hand-offs would cost more than the work (10-50x more on a busy machine).
_SINGLE_THREAD_NUMEL = 1 << 20


@contextlib.contextmanager
def _threads_for(x):
    if x.device.type != "cpu" or x.numel() >= _SINGLE_THREAD_NUMEL:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # on the validation features
    wd: float        # the weight decay used for the final fit (chosen on a held-out part of train if a grid)
    num_classes: int


def _check_pair(feats, labels, name):
    if not torch.is_tensor(feats) or feats.dim() != 2:
        raise ValueError(f"{name} features must be a [N, D] tensor, got shape {tuple(getattr(feats, 'shape', ()))}")
    if not torch.is_tensor(labels) or labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{name} labels must be a [N] tensor matching {feats.shape[0]} features, "
                         f"got shape {tuple(getattr(labels, 'shape', ()))}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} labels must be integers, got dtype {labels.dtype}")
    if feats.shape[0] == 0:
        raise ValueError(f"no {name} samples")
    if labels.min() < 0:
        raise ValueError(f"{name} labels must be non-negative class indices")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} features contain NaN or Inf")


def _fit(x, y, num_classes, wd, epochs, lr):
    """Multinomial logistic regression, mean cross-entropy + wd/2 |W|^2 (bias not decayed), from zeros.

    The problem is convex, so starting from zeros makes the fit depend on the data alone.
    """
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * wd * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads_for(x):
        opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(x, y, w, b):
    return (x @ w + b).argmax(dim=1).eq(y).double().mean().item()


def fit_linear_probe(train_feats, train_labels, val_feats, val_labels, *, epochs=100, lr=1.0,
                     wd: Union[float, Sequence[float]] = DEFAULT_WD_GRID, seed=0, holdout=0.2,
                     device="cpu", on_fit=None) -> ProbeResult:
    """Fit a linear classifier on standardised features and return its validation accuracy.

    Features are standardised with the training mean and std. With several ``wd`` values the one with the best
    accuracy on a seeded ``holdout`` fraction of the training set is chosen (ties: the larger wd), then the
    probe is refit on the whole training set; the validation set is never used for the choice.
    Runs in float64; the same inputs and seed give the same result. ``on_fit()`` is called after each fit
    (one per grid value, then the final one; just one for a single ``wd``), e.g. to move a progress bar.
    """
    _check_pair(train_feats, train_labels, "train")
    _check_pair(val_feats, val_labels, "val")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"train features have {train_feats.shape[1]} dims, val features {val_feats.shape[1]}")
    if epochs <= 0 or lr <= 0:
        raise ValueError(f"epochs and lr must be positive, got epochs={epochs}, lr={lr}")
    grid = sorted({float(v) for v in wd}) if isinstance(wd, (list, tuple)) else [float(wd)]
    if not grid or min(grid) < 0:
        raise ValueError(f"wd must be a non-negative number or a non-empty list of them, got {wd}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")

    dev = torch.device(device)
    xtr = train_feats.to(dev, torch.float64)
    xva = val_feats.to(dev, torch.float64)
    ytr = train_labels.to(dev, torch.long)
    yva = val_labels.to(dev, torch.long)
    num_classes = int(max(ytr.max().item(), yva.max().item())) + 1
    mean = xtr.mean(dim=0)
    std = xtr.std(dim=0, unbiased=False).clamp_min(1e-6)  # constant features become zeros, not NaN
    xtr = (xtr - mean) / std
    xva = (xva - mean) / std

    chosen = grid[0]
    if len(grid) > 1:
        n = xtr.shape[0]
        n_hold = min(max(1, int(round(holdout * n))), n - 1)
        if n_hold < 1:
            raise ValueError(f"need at least 2 training samples to choose wd from {grid}, got {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(dev)
        fit_idx, hold_idx = perm[n_hold:], perm[:n_hold]
        best = -1.0
        for v in grid:  # ascending, so ">=" keeps the larger wd on a tie
            w, b = _fit(xtr[fit_idx], ytr[fit_idx], num_classes, v, epochs, lr)
            acc = _accuracy(xtr[hold_idx], ytr[hold_idx], w, b)
            if on_fit is not None:
                on_fit()
            if acc >= best:
                best, chosen = acc, v
    w, b = _fit(xtr, ytr, num_classes, chosen, epochs, lr)
    if on_fit is not None:
        on_fit()
    return ProbeResult(accuracy=_accuracy(xva, yva, w, b), wd=chosen, num_classes=num_classes)


def linear_probe(train_feats, train_labels, val_feats, val_labels, *, epochs=100, lr=1.0,
                 wd: Union[float, Sequence[float]] = DEFAULT_WD_GRID, seed=0, device="cpu") -> float:
    """Validation accuracy of a linear probe on frozen features (see ``fit_linear_probe``)."""
    return fit_linear_probe(train_feats, train_labels, val_feats, val_labels, epochs=epochs, lr=lr, wd=wd,
                            seed=seed, device=device).accuracy


def _pooled_features(encoders, splits, batch_size, device, bar):
    """Each encoder's features of each split, batch by batch so that ``bar`` moves."""
    out = []
    for enc in encoders:
        per_split = []
        for x in splits:
            feats = []
            for start in range(0, x.shape[0], batch_size):
                feats.append(extract_features(enc, x[start:start + batch_size], batch_size, device))
                bar.update(feats[-1].shape[0])
            per_split.append(torch.cat(feats))
        out.append(per_split)
    return out


def probe_encoder(encoder, train_images, train_labels, val_images, val_labels, *, random_encoder=None,
                  batch_size=256, device=None, epochs=100, lr=1.0, wd: Union[float, Sequence[float]] = DEFAULT_WD_GRID,
                  seed=0, show_progress=False, stage="eval") -> dict:
    """Linear probe on the encoder's average-pooled features, and on ``random_encoder`` (the random-init control,
    e.g. ``features.random_init_encoder``) with identical settings when one is given.

    Returns ``probe_acc``, ``probe_wd`` and ``rankme`` (``rank.rankme`` of the validation features), plus
    ``probe_acc_random``, ``probe_wd_random`` and ``rankme_random`` with a control.
    The evaluation and the fine-tuning's probe protocol both run this; ``show_progress`` draws two bars,
    ``"<stage>: features"`` and ``"<stage>: linear probe"``.
    """
    encoders = [encoder] + ([random_encoder] if random_encoder is not None else [])
    total = len(encoders) * (train_images.shape[0] + val_images.shape[0])
    with progress_bar(total, f"{stage}: features", "img", enabled=show_progress) as bar:
        feats = _pooled_features(encoders, [train_images, val_images], batch_size, device, bar)
    grid = set(wd) if isinstance(wd, (list, tuple)) else {wd}
    fits = len(encoders) * (len(grid) + (len(grid) > 1))
    with progress_bar(fits, f"{stage}: linear probe", "fit", enabled=show_progress) as bar:
        res = [fit_linear_probe(ftr, train_labels, fva, val_labels, epochs=epochs, lr=lr, wd=wd, seed=seed,
                                on_fit=lambda: bar.update(1)) for ftr, fva in feats]
    out = {"probe_acc": res[0].accuracy, "probe_wd": res[0].wd, "rankme": rankme(feats[0][1]).item()}
    if random_encoder is not None:
        out.update(probe_acc_random=res[1].accuracy, probe_wd_random=res[1].wd,
                   rankme_random=rankme(feats[1][1]).item())
    return out
