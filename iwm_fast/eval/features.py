"""Frozen-encoder features: average-pooled tokens of an encoder in eval mode, and a run's random-init control."""
import contextlib

import torch


def _module_device(module):
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _module_dtype(module):
    p = next(module.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def as_float_images(images):
    """Images as float [B, 3, H, W] in [0, 1]; uint8 images are scaled by 1/255."""
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(getattr(images, 'shape', ()))}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got dtype {images.dtype}")
    return images


@contextlib.contextmanager
def eval_mode(module):
    """Eval mode for the duration of the block; the module's previous mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _normalize(images):
    from ..transforms import normalize  # imported late: evaluation must not fix the transforms' import order
    return normalize(images)


@torch.no_grad()
def extract_features(encoder, images, batch_size=256, device=None):
    """Average-pooled token features [B, D] (float32, on the CPU) of a frozen encoder.

    The encoder runs in eval mode without gradients on ImageNet-normalised images (``transforms.normalize``),
    exactly what it saw in training. ``device`` defaults to the encoder's own device; the encoder is not moved.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = as_float_images(images)
    device = _module_device(encoder) if device is None else torch.device(device)
    dtype = _module_dtype(encoder)
    feats = []
    with eval_mode(encoder):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device=device, dtype=torch.float32, non_blocking=True)
            tokens = encoder(_normalize(x).to(dtype))
            if tokens.dim() != 3:
                raise ValueError(f"encoder must return [B, N, D] tokens, got shape {tuple(tokens.shape)}")
            feats.append(tokens.float().mean(dim=1).cpu())
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats)


def random_init_encoder(cfg, seed, backends=None):
    """The random-init control of a run: the (frozen) target encoder of ``build_iwm(cfg, seed=seed)``, exactly
    what training starts from when ``seed`` is the run's ``train.seed``. The global RNG is left as it was."""
    from ..models import build_iwm

    with torch.random.fork_rng(devices=[]):
        return build_iwm(cfg, backends, seed=seed).target_encoder.requires_grad_(False)
