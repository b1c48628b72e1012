"""The collapse monitor: how many directions the representations still use, measured at log steps.

At a log step, forward hooks keep the pooled outputs of the target encoder and of the predictor on the step's
first micro-batch (the training forward's own outputs: no extra forward, no RNG drawn, nothing read back). The
log window turns them into three numbers at its flush, the one host read of the window:

- ``target_rankme``: RankMe (Garrido et al., 2023) of the target encoder's average-pooled features, one row per
  image: exp of the entropy of the singular values normalised to sum 1. It runs from 1 (every image has the same
  feature direction: collapse) to min(rows, dim).
- ``pred_rankme``: the same for the predictor's outputs, averaged over the predicted tokens of each row.
- ``target_std``: the mean over dimensions of the per-dimension std of the l2-normalised target features (as in
  SimSiam): 0 when every image maps to one direction, at most 1/sqrt(dim).

A line is logged when ``target_rankme`` falls below ``WARN_FRACTION`` of its reference, the first value the run
logged (kept in metrics.csv, so a resumed run keeps its reference).
"""
import contextlib
import csv
import logging

import torch

from ..eval.rank import normalized_std, rankme

log = logging.getLogger("iwm_fast")

FIELDS = ("target_rankme", "pred_rankme", "target_std")
# A healthy run's target rank moves by tens of percent over training (it usually rises from initialisation);
# a collapse divides it by several. Half of the first value separates the two on every run measured.
WARN_FRACTION = 0.5


def collapse_stats(target, pred):
    """``[target_rankme, pred_rankme, target_std]`` of pooled features, a float64 device tensor, computed
    without a host read: a matrix with fewer than 2 rows or a non-finite value gives NaN for its entries."""
    def safe(feats, fns):
        ok = torch.isfinite(feats).all()
        clean = torch.where(ok, feats, torch.zeros_like(feats))  # LAPACK refuses NaN; the result is masked
        if feats.shape[0] < 2:
            return [torch.full((), float("nan"), dtype=torch.float64, device=feats.device) for _ in fns]
        return [torch.where(ok, fn(clean), float("nan")) for fn in fns]

    t_rank, t_std = safe(target, (rankme, normalized_std))
    (p_rank,) = safe(pred, (rankme,))
    return torch.stack([t_rank, p_rank.to(t_rank.device), t_std])


class CollapseMonitor:
    """Captures the pooled features at watched steps, hands the log window their statistics, warns on collapse."""

    def __init__(self, model, *, enabled=True, reference=None):
        self.model, self.enabled = model, enabled
        self.reference = reference  # the run's first logged target_rankme
        self._pending = []          # (step, {"target": [N, D], "pred": [R, D]}) waiting for the flush
        self._warned = False

    @contextlib.contextmanager
    def watch(self, step, active):
        """Within the block, keep the first pooled outputs of the target encoder and the predictor (the first
        micro-batch's, before this step's update) when ``active``; they wait for the log window's flush."""
        if not (self.enabled and active):
            yield
            return
        kept = {}

        def keep(name):
            def hook(module, args, out):
                if name not in kept:
                    kept[name] = out.detach().float().mean(dim=1)
            return hook

        handles = [self.model.target_encoder.register_forward_hook(keep("target")),
                   self.model.predictor.register_forward_hook(keep("pred"))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if len(kept) == 2:
            self._pending.append((step, kept))

    def pending(self):
        """``(steps, stats)`` of the steps watched since the last call, stats a float64 device tensor [len(steps),
        len(FIELDS)], or None when there are none. The statistics are computed here, at the flush."""
        if not self._pending:
            return None
        steps = [step for step, _ in self._pending]
        stats = torch.stack([collapse_stats(kept["target"], kept["pred"]) for _, kept in self._pending])
        self._pending = []
        return steps, stats

    def observe(self, step, values):
        """Take the read-back ``values`` of ``step`` (aligned with ``FIELDS``); one warning line when the target
        rank falls below ``WARN_FRACTION`` of the reference, again only after it has recovered."""
        rank = values[0]
        if rank != rank:
            return
        if self.reference is None:
            self.reference = rank
            return
        low = rank < WARN_FRACTION * self.reference
        if low and not self._warned:
            log.warning("step %d: target_rankme %.2f is below %.0f%% of its first value %.2f: the representation "
                        "may be collapsing (see docs/collapse.md)", step, rank, 100 * WARN_FRACTION, self.reference)
        self._warned = low


def first_logged_rank(metrics_path, up_to_step):
    """The first ``target_rankme`` in the metrics CSV at ``metrics_path`` at a step <= ``up_to_step``, or None."""
    try:
        with open(metrics_path, newline="") as f:
            for row in csv.DictReader(f):
                step, value = row.get("step") or "", row.get("target_rankme") or ""
                if not step.isdigit() or int(step) > up_to_step:
                    continue
                try:
                    rank = float(value)
                except ValueError:
                    continue
                if rank == rank:
                    return rank
    except OSError:
        return None
    return None
