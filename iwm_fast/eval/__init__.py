"""Evaluation of trained encoders and world models: linear probe, world-model MRR, eval.json, loss plot."""
from .evaluate import evaluate
from .features import extract_features, random_like
from .mrr import (MrrSettings, QueryBatch, iwm_hooks, mrr_chance, mrr_chance_stderr, reciprocal_ranks,
                  world_model_mrr)
from .picture import world_model_figure
from .probe import DEFAULT_WD_GRID, ProbeResult, fit_linear_probe, linear_probe, probe_encoder
from .progress import progress_bar
from .report import REQUIRED_KEYS, format_summary, plot_loss_curve, read_loss_csv, write_eval

__all__ = ["evaluate", "extract_features", "random_like", "MrrSettings", "QueryBatch", "iwm_hooks", "mrr_chance",
           "mrr_chance_stderr", "reciprocal_ranks", "world_model_mrr", "DEFAULT_WD_GRID", "ProbeResult",
           "fit_linear_probe",
           "linear_probe", "probe_encoder", "REQUIRED_KEYS", "format_summary", "plot_loss_curve", "read_loss_csv",
           "write_eval", "world_model_figure", "progress_bar"]
