"""The whole evaluation of a trained IWM / I-JEPA model: linear probes and world-model MRR in one dict.

Three stages, each with a progress bar and an ETA on stderr: feature extraction (trained and random encoder),
the probe fits, the MRR's target-encoder passes.
"""
import logging
import time

import torch

from .features import build_random_encoder, extract_features
from .mrr import MrrSettings, world_model_mrr
from .picture import world_model_figure
from .probe import DEFAULT_WD_GRID, fit_linear_probe
from .progress import progress_bar

log = logging.getLogger("iwm_fast")


def _features(encoders, splits, batch_size, device, show):
    total = len(encoders) * sum(x.shape[0] for x in splits)
    out = []
    with progress_bar(total, "eval: features", "img", enabled=show) as bar:
        for enc in encoders:
            feats = []
            for x in splits:
                for start in range(0, x.shape[0], batch_size):  # per batch, so the bar moves
                    feats.append(extract_features(enc, x[start:start + batch_size], batch_size, device))
                    bar.update(min(batch_size, x.shape[0] - start))
            n_tr = splits[0].shape[0]
            allf = torch.cat(feats)
            out.append((allf[:n_tr], allf[n_tr:]))
    return out


def _say_mrr_cost(bank_size, num_queries, num_images):
    cost = bank_size * num_queries
    if bank_size > num_images:
        # The bank is not drawn from the dataset: it holds bank_size transformed views of each query image,
        # so a bank larger than the dataset is well defined; only its cost grows. Said at once, not clamped.
        log.warning("eval.bank_size=%d is larger than the %d evaluation images: allowed (the bank holds %d "
                    "transformed views of each query image, not other images), but the MRR will encode %d "
                    "images", bank_size, num_images, bank_size, cost)
    log.info("eval: MRR of %d queries against banks of %d views: %d target-encoder images", num_queries,
             bank_size, cost)


def evaluate(model, train_images, train_labels, val_images, val_labels, *, mrr_images=None, bank_size=256,
             num_queries=64, cfg=None, seed=0, device=None, batch_size=256, probe_epochs=100,
             probe_wd=DEFAULT_WD_GRID, show_progress=True, examples=0, picture=None) -> dict:
    """Probe the frozen target encoder (and a random twin), then measure the world-model MRR.

    The MRR queries are the first ``num_queries`` of ``mrr_images`` (the validation images by default).
    Returns the keys of ``probe_encoder`` and ``world_model_mrr`` plus ``eval_seconds``; with ``examples=n``
    also ``"examples"`` (pictures of n queries, see ``world_model_mrr``), which is not a JSON value.
    ``picture``: a PNG path where ``world_model_figure`` draws ``examples`` queries (4 if not given).
    """
    if bank_size < 1:
        raise ValueError(f"bank_size must be positive, got {bank_size}")
    t0 = time.perf_counter()
    encoder = model.target_encoder
    random_encoder = build_random_encoder(encoder, None, seed)
    (ftr, fva), (rtr, rva) = _features([encoder, random_encoder], [train_images, val_images], batch_size, device,
                                       show_progress)
    grid = probe_wd if isinstance(probe_wd, (list, tuple)) else [probe_wd]
    fits = 2 * (len(set(grid)) + (len(set(grid)) > 1))
    with progress_bar(fits, "eval: linear probe", "fit", enabled=show_progress) as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        trained = fit_linear_probe(ftr, train_labels, fva, val_labels, epochs=probe_epochs, wd=probe_wd, seed=seed,
                                   on_fit=tick)
        baseline = fit_linear_probe(rtr, train_labels, rva, val_labels, epochs=probe_epochs, wd=probe_wd,
                                    seed=seed, on_fit=tick)
    results = {"probe_acc": trained.accuracy, "probe_wd": trained.wd,
               "probe_acc_random": baseline.accuracy, "probe_wd_random": baseline.wd}
    queries = val_images if mrr_images is None else mrr_images
    num_queries = min(num_queries, queries.shape[0])
    _say_mrr_cost(bank_size, num_queries, train_images.shape[0] + val_images.shape[0])
    with progress_bar(num_queries * bank_size, "eval: world-model MRR", "img", enabled=show_progress) as bar:
        settings = MrrSettings(bank_size=bank_size, num_queries=num_queries, views=cfg, seed=seed,
                               batch_size=batch_size, examples=examples or (4 if picture else 0))
        results.update(world_model_mrr(model, queries, settings, device=device, progress=bar.update))
    if picture:
        shown = results["examples"] if examples else results.pop("examples")
        log.info("eval: world-model picture in %s", world_model_figure(shown, picture))
    results["eval_seconds"] = time.perf_counter() - t0
    return results
