"""A trained IWM as a world model: encode an image, apply a transformation in latent space, rank candidates.

    from iwm_fast.world_model import WorldModel
    wm = WorldModel.from_run("runs/demo_cpu")            # config.yaml + the latest complete checkpoint
    z = wm.encode(images)                                # [B, N, D] latent of each image (the predictor's input)
    a = wm.action(target={"brightness": 1.3, "hue": 0.2})   # [1, ACTION_DIM]; wm.identity_action(B) is "no change"
    z_hat = wm.predict(z, a)                             # [B, N, D] predicted latent of the transformed images
    ranked = wm.rank(z_hat, wm.target_latents(views))    # candidates best first

Two latent spaces are involved, as in training: ``encode`` runs the context encoder, whose tokens the predictor
reads; predictions live in the target encoder's layer-normed space, where ``target_latents`` puts candidate
images. ``wm.save(path)`` writes config and weights to one file that ``WorldModel.load(path)`` reads back.
"""
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .models import build_iwm
from .transforms import ACTION_DIM, ACTION_LAYOUT, JitterParams, TransformParams, action_vector, apply, normalize

_FORMAT = "iwm-fast-world-model/1"
_JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")
_VIEW_KEYS = _JITTER_KEYS + ("applied",)
_PIXEL_SLACK = 1e-6  # float rounding of [0, 1] pixels; more is a range mistake


def _jitter(batch, spec, name):
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(_VIEW_KEYS))
    if unknown:
        raise ValueError(f"{name} jitter has unknown keys {unknown}; known: {list(_VIEW_KEYS)}")
    vals = {}
    for key in _JITTER_KEYS:
        ident = 0.0 if key == "hue" else 1.0
        v = float(spec.get(key, ident))
        if key == "hue" and not -0.5 <= v <= 0.5:
            raise ValueError(f"{name} hue shift must be in [-0.5, 0.5] (a fraction of the colour wheel), got {v}")
        if key != "hue" and not v >= 0.0:
            raise ValueError(f"{name} {key} factor must be >= 0 (1 = unchanged), got {v}")
        vals[key] = v
    # A view counts as jittered when any factor differs from the identity, unless the caller says otherwise.
    applied = bool(spec.get("applied", any(vals[k] != (0.0 if k == "hue" else 1.0) for k in _JITTER_KEYS)))
    full = lambda v: torch.full((batch,), v, dtype=torch.float32)  # noqa: E731
    return JitterParams(torch.full((batch,), applied), *(full(vals[k]) for k in _JITTER_KEYS))


def transform_params(batch_size=1, *, target=None, source=None, grayscale=False, blur_sigma=0.0, solarize=False,
                     blur_radius=6, solarize_threshold=0.5) -> TransformParams:
    """The same explicit transformation for ``batch_size`` images, as ``iwm_fast.transforms.TransformParams``.

    ``target`` and ``source`` are dicts of colour-jitter factors (``brightness``, ``contrast``, ``saturation``:
    multiplicative, 1 = unchanged; ``hue``: a shift in [-0.5, 0.5]); the source may also be grayscaled, blurred
    (``blur_sigma`` > 0, in pixels) and solarized. ``iwm_fast.transforms.apply(images, params, "target")``
    renders the view; ``action_vector(params)`` is its action.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not blur_sigma >= 0.0:
        raise ValueError(f"blur_sigma must be >= 0 pixels, got {blur_sigma}")
    flag = lambda v: torch.full((batch_size,), bool(v))  # noqa: E731
    return TransformParams(source=_jitter(batch_size, source, "source"), target=_jitter(batch_size, target, "target"),
                           grayscale=flag(grayscale), blur=flag(blur_sigma > 0),
                           blur_sigma=torch.full((batch_size,), float(blur_sigma)), solarize=flag(solarize),
                           blur_radius=int(blur_radius), solarize_threshold=float(solarize_threshold))


def identity_action(batch_size=1) -> torch.Tensor:
    """The action of "no transformation": zeros, ``[batch_size, ACTION_DIM]``."""
    return action_vector(transform_params(batch_size))


def _reason(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_save_target(path):
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give WorldModel.save a file path, e.g. "
                                f"{os.path.join(path, 'world_model.pt')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise FileNotFoundError(f"cannot save the world model to {path}: {folder} {what}")


def _read_world_model(path):
    """The dict ``WorldModel.save`` wrote at ``path``; ValueError for anything else, naming what it is."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a world-model file (a run directory loads with "
                                "WorldModel.from_run)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no world-model file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails in many ways on foreign bytes (KeyError, UnpicklingError, ...)
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # how every file torch.save writes begins
        if zipped:
            raise ValueError(f"{path} is truncated or damaged: a torch file that does not load ({_reason(e)})") \
                from None
        raise ValueError(f"{path} is not a world model saved by WorldModel.save: not a torch file") from None
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT or not {"config", "state_dict"} <= set(blob):
        raise ValueError(f"{path} is not a world model saved by WorldModel.save "
                         "(a run directory loads with WorldModel.from_run)")
    return blob


def _check_pixel_range(images):
    """Float images must be [0, 1] pixels: 0-255 values (uint8 cast without /255) or mean/std-normalised
    images give wrong latents without any other sign."""
    if images.numel() == 0:
        return
    lo, hi = float(images.min()), float(images.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images hold NaN or Inf")
    if lo >= -_PIXEL_SLACK and hi <= 1 + _PIXEL_SLACK:
        return
    if lo < -0.05:  # pixel values are never negative: a mean and std were applied
        hint = "normalised with a mean and std? pass the [0, 1] pixels: the world model normalises them itself"
    elif hi > 2.0:
        hint = "0-255 pixel values? divide by 255 (or pass the uint8 tensor itself)"
    else:
        hint = "clamp them to [0, 1] (a resize can overshoot a little)"
    raise ValueError(f"float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {hint}")


class Ranking(NamedTuple):
    order: torch.Tensor   # [B, K] candidate indices, most similar first
    scores: torch.Tensor  # [B, K] cosine similarity of each candidate (in the candidates' own order)


class WorldModel:
    """An ``IWM`` model in eval mode with the config it was trained with; see the module docstring."""

    def __init__(self, model, cfg, *, step=None, device="cpu"):
        self.cfg = cfg
        self.step = step
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.image_size = tuple(model.encoder.img_size)
        self.num_patches = model.encoder.num_patches
        self.embed_dim = model.encoder.embed_dim
        self.conditioning = model.predictor.conditioning

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_run(cls, run_dir, *, device="cpu"):
        """The run's ``config.yaml`` and the weights of its newest checkpoint that verifies."""
        from .run_dir import RunDir

        loaded = RunDir(run_dir).load_model()
        return cls(loaded.model, loaded.cfg, step=loaded.step, device=device)

    def save(self, path):
        """One file with the config and the whole model (encoders and predictor); ``WorldModel.load`` reads it.

        Written to ``path.tmp`` and renamed, so a failed save leaves neither a partial file nor the ``.tmp``;
        a folder as ``path``, a missing folder and a failed write are one clear error each."""
        from .config import to_dict

        path = os.fspath(path)
        _check_save_target(path)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        tmp = f"{path}.tmp"
        try:
            torch.save({"format": _FORMAT, "config": to_dict(self.cfg), "step": self.step, "state_dict": state}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
            if os.path.lexists(tmp) and not os.path.isdir(tmp):
                os.remove(tmp)
            raise OSError(f"could not write the world model to {path} ({_reason(e)})") from None
        return path

    @classmethod
    def load(cls, path, *, device="cpu"):
        """A world model written by ``save``; a missing, foreign, truncated or damaged file is one clear error."""
        from .config import ConfigError, from_dict

        blob = _read_world_model(os.fspath(path))
        try:
            cfg = from_dict(blob["config"])
        except ConfigError as e:
            raise ValueError(f"{path}: its config does not fit this version of iwm-fast: {e}") from None
        model = build_iwm(cfg)
        try:
            model.load_state_dict(blob["state_dict"], strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is damaged: its weights do not fit its own config ({_reason(e)})") from None
        return cls(model, cfg, step=blob.get("step"), device=device)

    # ------------------------------------------------------------------ actions
    def action(self, batch_size=1, **kwargs) -> torch.Tensor:
        """The action of an explicit transformation (keywords of ``transform_params``), on this model's device."""
        return action_vector(transform_params(batch_size, **kwargs)).to(self.device)

    def identity_action(self, batch_size=1) -> torch.Tensor:
        return identity_action(batch_size).to(self.device)

    def render(self, images, params: TransformParams, view="target") -> torch.Tensor:
        """The transformed images of ``params`` (what ``predict`` should foresee); float images in [0, 1]."""
        return apply(self._images(images), params.to(self.device), view)

    # ------------------------------------------------------------------ the world model
    def _images(self, images):
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] (or one [3, H, W] image), got {tuple(images.shape)}")
        if tuple(images.shape[2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(f"images must be {h}x{w} pixels (this world model's data.image_size), "
                             f"got {images.shape[2]}x{images.shape[3]}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        else:
            _check_pixel_range(images)
        return images.to(self.device, torch.float32)

    def _latents(self, z, name):
        if not torch.is_tensor(z) or z.dim() != 3 or z.shape[1:] != (self.num_patches, self.embed_dim):
            raise ValueError(f"{name} must be [B, {self.num_patches}, {self.embed_dim}] latents (from encode), "
                             f"got {tuple(getattr(z, 'shape', ()))}")
        return z.to(self.device, torch.float32)

    def _action(self, action, batch):
        if not torch.is_tensor(action):
            action = torch.as_tensor(action, dtype=torch.float32)
        if action.dim() == 1:
            action = action[None]
        if action.dim() != 2 or action.shape[1] != ACTION_DIM:
            got = action.shape[-1] if action.dim() else 0
            raise ValueError(f"action must have {ACTION_DIM} entries per image (layout: "
                             f"iwm_fast.transforms.ACTION_LAYOUT = {', '.join(ACTION_LAYOUT)}), got {got} "
                             f"(shape {tuple(action.shape)})")
        if action.shape[0] == 1 and batch > 1:
            action = action.expand(batch, -1)
        if action.shape[0] != batch:
            raise ValueError(f"{action.shape[0]} actions for {batch} latents; give one, or one per latent")
        if not torch.isfinite(action).all():
            raise ValueError("action holds NaN or Inf")
        return action.to(self.device, torch.float32)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """The context encoder's tokens of whole images ([B, 3, H, W] float in [0, 1] or uint8): [B, N, D]."""
        return self.model.encoder(normalize(self._images(images))).float()

    @torch.no_grad()
    def target_latents(self, images) -> torch.Tensor:
        """The space predictions live in: the target encoder's layer-normed tokens, [B, N, D]."""
        h = self.model.target_encoder(normalize(self._images(images))).float()
        return F.layer_norm(h, (h.shape[-1],))

    @torch.no_grad()
    def predict(self, z, action=None) -> torch.Tensor:
        """The predicted target latents [B, N, D] of the images behind ``z`` after ``action`` ([B or 1, ACTION_DIM]).

        An I-JEPA model (conditioning "none") has no action input: pass none (an action is then an error,
        since the model could not follow it).
        """
        z = self._latents(z, "z")
        B, N = z.shape[:2]
        if self.conditioning == "none":
            if action is not None:
                raise ValueError("this model was trained without conditioning (predictor.conditioning=none): "
                                 "it cannot take an action; call predict(z)")
            act = None
        else:
            act = self._action(self.identity_action(B) if action is None else action, B)
        pos = torch.arange(N, device=self.device)
        return self.model.predictor(z, pos[None].expand(B, N), pos[None, None].expand(B, 1, N), act).float()

    @torch.no_grad()
    def rank(self, z_hat, candidates) -> Ranking:
        """Rank ``candidates`` for each prediction by cosine similarity of average-pooled latents (as the MRR).

        ``z_hat``: [B, N, D] predictions; ``candidates``: [K, N, D] latents shared by all predictions, or
        [B, K, N, D] one bank per prediction (both from ``target_latents``).
        """
        z_hat = self._latents(z_hat, "z_hat")
        if not torch.is_tensor(candidates) or candidates.dim() not in (3, 4):
            raise ValueError("candidates must be [K, N, D] or [B, K, N, D] latents, "
                             f"got {tuple(getattr(candidates, 'shape', ()))}")
        if candidates.dim() == 3:
            self._latents(candidates, "candidates")
            candidates = candidates[None].expand(z_hat.shape[0], -1, -1, -1)
        elif candidates.shape[0] != z_hat.shape[0] or candidates.shape[2:] != z_hat.shape[1:]:
            raise ValueError(f"candidates {tuple(candidates.shape)} do not fit {z_hat.shape[0]} predictions of "
                             f"shape {tuple(z_hat.shape[1:])}")
        p = F.normalize(z_hat.mean(dim=1), dim=-1)
        c = F.normalize(candidates.to(self.device, torch.float32).mean(dim=2), dim=-1)
        scores = torch.einsum("bd,bkd->bk", p, c)
        return Ranking(order=scores.argsort(dim=1, descending=True, stable=True), scores=scores)

    def rank_of(self, z_hat, candidates, true_index) -> torch.Tensor:
        """1-based rank of candidate ``true_index`` ([B] or an int, in [0, K)) for each prediction.

        An index outside the bank is an error: it matches no candidate, and would otherwise read as rank 1."""
        r = self.rank(z_hat, candidates)
        batch, bank = r.order.shape
        true = torch.as_tensor(true_index)
        if true.is_floating_point() or true.is_complex() or true.dtype == torch.bool:
            raise TypeError(f"true_index must be an int or an integer tensor, got {true.dtype}")
        if true.dim() > 1 or (true.dim() == 1 and true.numel() not in (1, batch)):
            raise ValueError(f"true_index must be one int or {batch} (one per prediction), got shape "
                             f"{tuple(true.shape)}")
        bad = (true < 0) | (true >= bank)
        if bool(bad.any()):
            raise ValueError(f"true_index must be in [0, {bank}) (a candidate of the bank of {bank}), got "
                             f"{int(true.reshape(-1)[bad.reshape(-1)][0])}")
        true = true.to(self.device).long().reshape(-1).expand(batch)
        return (r.order == true[:, None]).float().argmax(dim=1) + 1
