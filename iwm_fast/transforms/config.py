"""The photometric-view settings of IWM (defaults from the IWM paper's strong setting)."""
import math
from dataclasses import dataclass
from typing import Optional


def _check_prob(name, p):
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"TransformConfig.{name} must be a probability in [0, 1], got {p!r}")


def _check_nonneg(name, v, upper=math.inf):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= upper):
        bound = "" if upper == math.inf else f" and <= {upper}"
        raise ValueError(f"TransformConfig.{name} must be a finite number >= 0{bound}, got {v!r}")


@dataclass
class TransformConfig:
    """Colour jitter of both views and the source-only destructive transforms.

    Jitter strengths follow torchvision's ``ColorJitter`` convention: brightness ``b`` draws a factor from
    ``[max(0, 1-b), 1+b]`` (contrast and saturation likewise) and hue ``h`` draws a shift from ``[-h, h]``.
    ``blur_sigma`` is the range of the Gaussian's standard deviation in pixels; the kernel reaches
    ``ceil(blur_truncate * blur_sigma[1])`` pixels each side. ``solarize_threshold`` is on the [0, 1] scale
    (0.5 is the usual 128 of uint8 images); pixels ``>= threshold`` are inverted, so a threshold above 1
    never solarizes.
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    source_jitter_p: Optional[float] = None  # the source view's own jitter probability; None: jitter_p
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_sigma: tuple = (0.1, 2.0)
    blur_truncate: float = 3.0
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the first field out of range; ``blur_sigma`` is made a pair of floats."""
        for name in ("brightness", "contrast", "saturation"):
            _check_nonneg(name, getattr(self, name))
        _check_nonneg("hue", self.hue, upper=0.5)
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check_prob(name, getattr(self, name))
        if self.source_jitter_p is not None:
            _check_prob("source_jitter_p", self.source_jitter_p)
        sig = self.blur_sigma
        if (not isinstance(sig, (tuple, list)) or len(sig) != 2
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sig)
                or not (0.0 < sig[0] <= sig[1] < math.inf)):
            raise ValueError(f"TransformConfig.blur_sigma must be a pair (lo, hi) with 0 < lo <= hi, got {sig!r}")
        self.blur_sigma = (float(sig[0]), float(sig[1]))
        if not isinstance(self.blur_truncate, (int, float)) or not 0.5 <= self.blur_truncate <= 10:
            raise ValueError(f"TransformConfig.blur_truncate must be in [0.5, 10], got {self.blur_truncate!r}")
        _check_nonneg("solarize_threshold", self.solarize_threshold)

    @property
    def source_p(self) -> float:
        """The probability that the source view is colour-jittered."""
        return self.jitter_p if self.source_jitter_p is None else self.source_jitter_p

    @property
    def blur_radius(self) -> int:
        """Kernel half-width in pixels, fixed per config so that shapes stay static across steps."""
        return int(math.ceil(self.blur_truncate * self.blur_sigma[1]))
