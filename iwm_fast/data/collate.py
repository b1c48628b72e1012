"""Batch samples, dropping the ones that could not be read."""
import torch


def collate_skip_bad(items, image_size=None):
    """``items`` are ``(image uint8 [3, H, W], label, index)`` or None for an unreadable file.

    Returns ``{"images": uint8 [B, 3, H, W], "labels": int64 [B], "indices": int64 [B],
    "batch_positions": int64 [B], "num_skipped": int}`` where B counts only the readable samples (it may be
    smaller than the batch size, even 0); ``batch_positions`` are the kept samples' places among the
    ``len(items)`` drawn, so per-position randomness (views, masks) stays with the right sample.
    """
    kept = [k for k, it in enumerate(items) if it is not None]
    good = [items[k] for k in kept]
    skipped = len(items) - len(good)
    if not good:
        h, w = (image_size, image_size) if isinstance(image_size, int) else (image_size or (0, 0))
        return {"images": torch.empty(0, 3, h, w, dtype=torch.uint8), "labels": torch.empty(0, dtype=torch.long),
                "indices": torch.empty(0, dtype=torch.long),
                "batch_positions": torch.empty(0, dtype=torch.long), "num_skipped": skipped}
    images = [it[0] for it in good]
    if not all(isinstance(x, torch.Tensor) for x in images):  # data.decode=gpu: JPEGs to decode on the device
        return {"images": images, "labels": torch.tensor([int(it[1]) for it in good], dtype=torch.long),
                "indices": torch.tensor([int(it[2]) for it in good], dtype=torch.long),
                "batch_positions": torch.tensor(kept, dtype=torch.long), "num_skipped": skipped}
    return {"images": torch.stack(images),
            "labels": torch.tensor([int(it[1]) for it in good], dtype=torch.long),
            "indices": torch.tensor([int(it[2]) for it in good], dtype=torch.long),
            "batch_positions": torch.tensor(kept, dtype=torch.long),
            "num_skipped": skipped}
