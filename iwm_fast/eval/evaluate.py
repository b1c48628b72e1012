"""The whole evaluation of a trained IWM / I-JEPA model: linear probes and world-model MRR in one dict."""
import time

from .mrr import world_model_mrr
from .probe import DEFAULT_WD_GRID, probe_encoder


def evaluate(model, train_images, train_labels, val_images, val_labels, *, mrr_images=None, bank_size=256,
             num_queries=64, cfg=None, seed=0, device=None, batch_size=256, probe_epochs=100,
             probe_wd=DEFAULT_WD_GRID, transforms=None) -> dict:
    """Probe the frozen target encoder (and a random twin), then measure the world-model MRR.

    The MRR queries are the first ``num_queries`` of ``mrr_images`` (the validation images by default).
    Returns the keys of ``probe_encoder`` and ``world_model_mrr`` plus ``eval_seconds``.
    """
    t0 = time.perf_counter()
    results = probe_encoder(model.target_encoder, train_images, train_labels, val_images, val_labels,
                            batch_size=batch_size, device=device, epochs=probe_epochs, wd=probe_wd, seed=seed)
    queries = val_images if mrr_images is None else mrr_images
    num_queries = min(num_queries, queries.shape[0])
    results.update(world_model_mrr(model, queries, bank_size=bank_size, num_queries=num_queries, cfg=cfg,
                                   seed=seed, device=device, batch_size=batch_size, transforms=transforms))
    results["eval_seconds"] = time.perf_counter() - t0
    return results
