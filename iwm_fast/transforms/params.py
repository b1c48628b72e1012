"""Per-sample transformation parameters, and their seeded sampling."""
from dataclasses import dataclass, fields

import torch

from .config import TransformConfig
from .seeding import generator

_JITTER = ("brightness", "contrast", "saturation", "hue")


@dataclass
class JitterParams:
    """Colour jitter of one view, one entry per sample.

    Factors are the *effective* ones: where ``applied`` is False they hold the identity
    (brightness, contrast, saturation 1; hue 0).
    """

    applied: torch.Tensor      # bool [B]
    brightness: torch.Tensor   # float32 [B]
    contrast: torch.Tensor     # float32 [B]
    saturation: torch.Tensor   # float32 [B]
    hue: torch.Tensor          # float32 [B], shift of H in [-0.5, 0.5]

    def _map(self, fn):
        return JitterParams(*(fn(getattr(self, f.name)) for f in fields(self)))


@dataclass
class TransformParams:
    """Everything that defines one batch of (source, target) views, given the shared crop.

    ``blur_sigma`` is 0 where ``blur`` is False. ``blur_radius`` (pixels each side of the kernel) and
    ``solarize_threshold`` are per batch, fixed by the config, so shapes never depend on the draws.
    """

    source: JitterParams
    target: JitterParams
    grayscale: torch.Tensor    # bool [B]
    blur: torch.Tensor         # bool [B]
    blur_sigma: torch.Tensor   # float32 [B]
    solarize: torch.Tensor     # bool [B]
    blur_radius: int = 6
    solarize_threshold: float = 0.5

    @property
    def batch_size(self) -> int:
        return int(self.grayscale.shape[0])

    @property
    def device(self) -> torch.device:
        return self.grayscale.device

    def _map(self, fn):
        return TransformParams(self.source._map(fn), self.target._map(fn), fn(self.grayscale), fn(self.blur),
                               fn(self.blur_sigma), fn(self.solarize), self.blur_radius, self.solarize_threshold)

    def to(self, device, non_blocking=False) -> "TransformParams":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def __getitem__(self, index) -> "TransformParams":
        """Select samples, e.g. ``params[rank::world_size]`` for this rank's share of a global batch."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])


def sample_params(batch_size, *, cfg=None, seed=0, step=0, device="cpu", clean_source=False) -> TransformParams:
    """Draw the parameters of a batch from a CPU generator keyed by (seed, step), then move them to ``device``.

    The same arguments give the same parameters on every device and in every process. ``clean_source=True``
    turns every source transform off (no jitter, no grayscale, blur or solarize) while leaving the target
    draws unchanged: the evaluation predicts a transformed image's latent from the clean image.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cfg = TransformConfig() if cfg is None else cfg
    if not isinstance(cfg, TransformConfig):
        raise TypeError(f"cfg must be a TransformConfig, got {type(cfg).__name__}")
    g = generator(seed, step)
    # One draw of 14 uniforms per sample, columns fixed, so clean_source only masks the result.
    u = torch.rand(batch_size, 14, generator=g, dtype=torch.float64)

    def jitter(col, off, p):
        applied = u[:, col] < p
        facs = []
        for k, name in enumerate(_JITTER):
            x = u[:, col + 1 + k]
            if name == "hue":
                f = (2.0 * x - 1.0) * cfg.hue
            else:
                s = getattr(cfg, name)
                lo, hi = max(0.0, 1.0 - s), 1.0 + s
                f = lo + (hi - lo) * x
            ident = 0.0 if name == "hue" else 1.0
            facs.append(torch.where(applied & ~off, f, torch.full_like(f, ident)).float())
        return JitterParams(applied & ~off, *facs)

    off = torch.full((batch_size,), bool(clean_source))
    keep = torch.zeros(batch_size, dtype=torch.bool)
    lo, hi = cfg.blur_sigma
    blur = (u[:, 11] < cfg.blur_p) & ~off
    sigma = torch.where(blur, lo + (hi - lo) * u[:, 12], torch.zeros_like(u[:, 12])).float()
    params = TransformParams(
        source=jitter(0, off, cfg.source_p),
        target=jitter(5, keep, cfg.jitter_p),
        grayscale=(u[:, 10] < cfg.grayscale_p) & ~off,
        blur=blur,
        blur_sigma=sigma,
        solarize=(u[:, 13] < cfg.solarize_p) & ~off,
        blur_radius=cfg.blur_radius,
        solarize_threshold=float(cfg.solarize_threshold),
    )
    return params if torch.device(device).type == "cpu" else params.to(device)
