"""The whole evaluation of a trained IWM / I-JEPA model: linear probes and world-model MRR in one dict.

Four stages, each with a progress bar and an ETA on stderr: feature extraction (trained and random encoder),
the probe fits, the pixel probe's fits, the MRR's target-encoder passes.
"""
import logging
import time

from .mrr import MrrSettings, world_model_mrr
from .picture import world_model_figure
from .pixels import pixel_features
from .probe import DEFAULT_WD_GRID, fit_linear_probe, probe_encoder
from .progress import progress_bar

log = logging.getLogger("iwm_fast")


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


def _pixel_probe(train_images, train_labels, val_images, val_labels, *, epochs, wd, seed, show_progress):
    """The encoder probe's fit on the images' pixels (``pixels.pixel_features``): what the features must beat."""
    grid = set(wd) if isinstance(wd, (list, tuple)) else {wd}
    with progress_bar(len(grid) + (len(grid) > 1), "eval: pixel probe", "fit", enabled=show_progress) as bar:
        res = fit_linear_probe(pixel_features(train_images), train_labels, pixel_features(val_images), val_labels,
                               epochs=epochs, wd=wd, seed=seed, on_fit=lambda: bar.update(1))
    return {"probe_acc_pixels": res.accuracy, "probe_wd_pixels": res.wd}


def evaluate(model, train_images, train_labels, val_images, val_labels, *, random_encoder, mrr_images=None,
             bank_size=256, num_queries=64, cfg=None, seed=0, device=None, batch_size=256, probe_epochs=100,
             probe_wd=DEFAULT_WD_GRID, show_progress=True, examples=0, picture=None) -> dict:
    """Probe the frozen target encoder and ``random_encoder`` (the random-init control, on the same device;
    ``features.random_init_encoder`` builds a run's), then measure the world-model MRR.

    The MRR queries are the first ``num_queries`` of ``mrr_images`` (the validation images by default).
    Returns the keys of ``probe_encoder`` and ``world_model_mrr``, ``probe_acc_pixels`` and ``probe_wd_pixels``
    (the same probe on the pixels) and ``eval_seconds``; with ``examples=n`` also ``"examples"`` (pictures of n
    queries, see ``world_model_mrr``), which is not a JSON value.
    ``picture``: a PNG path where ``world_model_figure`` draws ``examples`` queries (4 if not given).
    """
    if bank_size < 1:
        raise ValueError(f"bank_size must be positive, got {bank_size}")
    t0 = time.perf_counter()
    results = probe_encoder(model.target_encoder, train_images, train_labels, val_images, val_labels,
                            random_encoder=random_encoder, batch_size=batch_size, device=device, epochs=probe_epochs,
                            wd=probe_wd, seed=seed, show_progress=show_progress)
    results.update(_pixel_probe(train_images, train_labels, val_images, val_labels, epochs=probe_epochs,
                                wd=probe_wd, seed=seed, show_progress=show_progress))
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
