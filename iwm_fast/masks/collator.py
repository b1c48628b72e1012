"""Drop-in replacement for I-JEPA's ``MaskCollator`` (src/masks/multiblock.py), backed by sample_block_masks."""
import torch
import torch.utils.data

from .sampler import sample_block_masks

_SEED_MIX = 0x9E3779B97F4A7C15


class MultiBlockMaskCollator:
    """Collate a batch and sample its masks: returns ``(default_collate(batch), masks_enc, masks_pred)``.

    ``masks_enc`` is a list of ``nenc`` int64 ``[B, K_enc]`` tensors and ``masks_pred`` a list of ``npred``
    ``[B, K_pred]`` tensors, as in the official collator. Context blocks have aspect 1, as there.

    Randomness: batch ``i`` uses ``(seed, i)``, so a run repeats and successive batches differ. In a DataLoader
    worker the seed is mixed with the worker's torch seed (``base_seed + worker id``; base_seed is drawn from
    the main process's torch generator for every epoch), so workers, and epochs with non-persistent workers,
    get different streams while ``torch.manual_seed`` still makes the whole run repeat.

    ``input_size`` may be ``(frames, H, W)`` with ``patch_size`` ``(tubelet, p, p)`` for video (3-D blocks).
    ``backend`` and ``device``: ``sample_block_masks``'s (``iwm_fast.backends.MASKS``).
    """

    def __init__(self, input_size=(224, 224), patch_size=16, enc_mask_scale=(0.2, 0.8),
                 pred_mask_scale=(0.2, 0.8), aspect_ratio=(0.3, 3.0), nenc=1, npred=2, min_keep=4,
                 allow_overlap=False, *, seed=0, device="cpu", backend="auto", max_tries=100):
        size = (input_size,) * 2 if isinstance(input_size, int) else tuple(input_size)
        patch = (patch_size,) * len(size) if isinstance(patch_size, int) else tuple(patch_size)
        if len(size) not in (2, 3) or len(patch) != len(size):
            raise ValueError(f"input_size {input_size!r} and patch_size {patch_size!r} must both have 2 or 3 sides")
        if any(p <= 0 for p in patch) or any(s % p for s, p in zip(size, patch)):
            raise ValueError(f"input_size {size} must be divisible by patch_size {patch}")
        self.grid = tuple(s // p for s, p in zip(size, patch))
        self.enc_mask_scale, self.pred_mask_scale = tuple(enc_mask_scale), tuple(pred_mask_scale)
        self.aspect_ratio = tuple(aspect_ratio)
        self.nenc, self.npred, self.min_keep, self.allow_overlap = nenc, npred, min_keep, allow_overlap
        self.seed, self.device, self.backend, self.max_tries = seed, device, backend, max_tries
        self.step = 0
        # Fail at construction, not in a worker, on impossible settings.
        self.sample(1, seed=seed, step=0)

    def _stream_seed(self) -> int:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.seed
        return (self.seed * _SEED_MIX + info.seed) % 2**63

    def sample(self, batch_size: int, *, seed: int, step: int):
        context, targets = sample_block_masks(
            batch_size, self.grid, num_targets=self.npred, target_scale=self.pred_mask_scale,
            target_aspect=self.aspect_ratio, context_scale=self.enc_mask_scale, context_aspect=(1.0, 1.0),
            num_contexts=self.nenc, min_keep=self.min_keep, allow_overlap=self.allow_overlap, seed=seed, step=step,
            device=self.device, backend=self.backend, max_tries=self.max_tries)
        if self.nenc == 1:
            context = context[:, None]
        return list(context.unbind(1)), list(targets.unbind(1))

    def __call__(self, batch):
        if len(batch) == 0:  # default_collate would fail with a bare IndexError
            raise ValueError("MultiBlockMaskCollator got an empty batch: a batch needs at least one sample")
        collated = torch.utils.data.default_collate(batch)
        masks_enc, masks_pred = self.sample(len(batch), seed=self._stream_seed(), step=self.step)
        self.step += 1
        return collated, masks_enc, masks_pred
