"""The one model factory: an IWM (context encoder, EMA target encoder, predictor) from a run config.

The training engine, the evaluation, the fine-tuning and the end-to-end benchmark all build their model here,
so what the benchmark times is what the engine trains.
"""
import torch

from ..transforms import ACTION_DIM
from .choices import resolve_predictor
from .iwm import IWM
from .predictor import IWMPredictor
from .vit import build_vit


def build_iwm(cfg, backends=None, *, seed=None):
    """The IWM model of ``cfg`` (model, predictor, data.image_size, train.loss), initialised from ``seed``
    (default ``cfg.train.seed``; identical on every rank). ``backends`` picks the layers' attention and gather
    implementations (``iwm_fast.backends.Backends``; default: the fused ones)."""
    from ..backends import Backends

    backends = backends or Backends(attention=cfg.model.attn_backend)
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    m = cfg.model
    extra = {"depth": m.depth} if m.depth else {}
    if m.patch_init_std:
        extra["patch_init_std"] = m.patch_init_std
    attn = backends.attention
    encoder = build_vit(m.size, img_size=cfg.data.image_size, patch_size=m.patch_size, attn_backend=attn,
                        gather_backend=backends.gather, **extra)
    depth, width, conditioning, target_mode = resolve_predictor(cfg.predictor)
    predictor = IWMPredictor(encoder.grid, encoder.embed_dim, width, depth=depth,
                             num_heads=cfg.predictor.num_heads or encoder.num_heads, conditioning=conditioning,
                             action_dim=ACTION_DIM if conditioning != "none" else 0, target_mode=target_mode,
                             attn_backend=attn, gather_backend=backends.gather)
    return IWM(encoder, predictor, loss=cfg.train.loss)
