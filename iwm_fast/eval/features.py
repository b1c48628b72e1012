"""Frozen-encoder features: average-pooled tokens of an encoder in eval mode, and a random-init twin."""
import contextlib

import torch
import torch.nn as nn

from ..models.vit import VisionTransformer


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


def _vit_constructor_args(vit):
    block = vit.blocks[0] if len(vit.blocks) else None
    hidden = block.mlp.fc1.out_features if block is not None else int(vit.embed_dim * 4)
    return dict(img_size=vit.img_size, patch_size=vit.patch_size, in_chans=vit.in_chans, embed_dim=vit.embed_dim,
                depth=len(vit.blocks), num_heads=vit.num_heads,
                # +0.5 so that int(dim * ratio) in the constructor gives back exactly `hidden`
                mlp_ratio=(hidden + 0.5) / vit.embed_dim,
                qkv_bias=block.attn.qkv.bias is not None if block is not None else True,
                init_std=vit.init_std, attn_backend=block.attn.backend if block is not None else "auto",
                patch_init_std=getattr(vit, "patch_init_std", None))


def random_like(encoder, seed=0):
    """A freshly initialised encoder of the same architecture, seeded, on the same device and dtype.

    A ``VisionTransformer`` is rebuilt with its own constructor (and so its own initialisation) from the
    arguments read off the trained module; the global RNG state is left untouched. For other encoders pass
    a factory to ``probe_encoder(random_encoder=...)`` instead.
    """
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"random_like rebuilds VisionTransformer encoders only, got {type(encoder).__name__}; "
                        "pass random_encoder=<module or callable(seed)> instead")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = VisionTransformer(**_vit_constructor_args(encoder))
    ref = {k: v.shape for k, v in encoder.state_dict().items()}
    got = {k: v.shape for k, v in fresh.state_dict().items()}
    if ref != got:
        raise ValueError("could not rebuild the encoder's architecture (state dict keys or shapes differ); "
                         "pass random_encoder=<module or callable(seed)> instead")
    fresh.requires_grad_(False)
    return fresh.to(device=_module_device(encoder), dtype=_module_dtype(encoder))


def build_random_encoder(encoder, random_encoder=None, seed=0):
    """Resolve the random baseline: None -> ``random_like``; a module is used as is; a callable gets ``seed``."""
    if random_encoder is None:
        return random_like(encoder, seed)
    if isinstance(random_encoder, nn.Module):
        return random_encoder
    if callable(random_encoder):
        module = random_encoder(seed)
        if not isinstance(module, nn.Module):
            raise TypeError(f"random_encoder factory returned {type(module).__name__}, expected an nn.Module")
        return module
    raise TypeError(f"random_encoder must be None, an nn.Module or a callable(seed), got {type(random_encoder)}")
