"""``data.decode=gpu``: JPEG batches decoded on the training GPU with nvJPEG, then cropped and resized there.

Workers then only read the file, parse its header and draw the crop (the same box and flip as the CPU path,
from the same (seed, epoch, index) key); ``torchvision.io.decode_jpeg(device="cuda")`` decodes the batch and
the crop is resized with the same antialiased bilinear filter, in float on the GPU. Files that are not
baseline JPEG (PNG, CMYK, 16-bit, ...) are decoded and cropped on the CPU in the worker as before.

nvJPEG's IDCT is not libjpeg-turbo's: pixels differ from the CPU path by a few grey levels, so a run resumed
with the other decode setting is not bit-identical. Needs a CUDA device and a torchvision built for this
torch; otherwise ``enable`` says why in one line and the CPU path is used.
"""
import io
from dataclasses import dataclass

import torch


@dataclass
class JpegCrop:
    """A JPEG file's bytes with the crop to take from it: (top, left, h, w) in pixels, flip, output size."""
    data: torch.Tensor
    box: tuple
    flip: bool
    out: tuple


def unavailable_reason():
    """None when nvJPEG decoding can run here, else why not (one phrase)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        # A real batched decode of a tiny JPEG: an old torchvision (no list input before 0.19) or one built for
        # another torch fails here, at start-up, rather than at the first batch.
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 30, 60)).save(buf, "JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        out = decode_jpeg([data], mode=ImageReadMode.UNCHANGED, device="cuda")
        if out[0].shape != (3, 8, 16) or out[0].device.type != "cuda":
            return f"torchvision's decode_jpeg returned {tuple(out[0].shape)} on {out[0].device}"
    except Exception as err:  # not installed, or built for another torch (import or operator errors)
        msg = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        return f"torchvision's nvJPEG decode is not usable ({type(err).__name__}: {msg})"
    return None


def jpeg_crop(data, name, out, *, scale, ratio=(3 / 4, 4 / 3), generator=None, flip_p=0.5, max_pixels=0):
    """A ``JpegCrop`` for the GPU, or None when the file is not a plain 8-bit JPEG (decode it on the CPU)."""
    from PIL import Image

    from ..transforms.geometry import sample_crop_box
    from .decode import _Unusable

    with Image.open(io.BytesIO(data)) as im:
        if im.format != "JPEG" or im.mode not in ("RGB", "L"):
            return None
        W, H = im.size
        if max_pixels and W * H > max_pixels:
            raise _Unusable(f"{W}x{H} is over data.max_image_pixels = {max_pixels}")
    box = sample_crop_box(H, W, scale, ratio, generator)
    flip = torch.rand(1, generator=generator, dtype=torch.float64).item() < flip_p
    return JpegCrop(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip, out)


def _finish_one(img, crop):
    import torch.nn.functional as F

    top, left, h, w = crop.box
    x = img[:, top:top + h, left:left + w]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    y = F.interpolate(x[None].float(), size=crop.out, mode="bilinear", align_corners=False, antialias=True)[0]
    y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y.flip(-1) if crop.flip else y


class GpuFinisher:
    """Turns a batch whose ``images`` is a list (``JpegCrop`` or CPU-decoded uint8 [3, S, S]) into uint8
    [B, 3, S, S] on ``device``."""

    def __init__(self, device):
        self.device = device

    def finish(self, batch):
        images = batch["images"]
        if isinstance(images, torch.Tensor):
            return batch
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [k for k, x in enumerate(images) if isinstance(x, JpegCrop)]
        out = [x.to(self.device, non_blocking=True) if isinstance(x, torch.Tensor) else None for x in images]
        if jpegs:
            decoded = decode_jpeg([images[k].data for k in jpegs], mode=ImageReadMode.UNCHANGED, device=self.device)
            for k, img in zip(jpegs, decoded):
                out[k] = _finish_one(img, images[k])
        batch["images"] = torch.stack(out) if out else torch.empty(0, 3, 0, 0, dtype=torch.uint8, device=self.device)
        return batch


def enable(dataset, log=None):
    """Switch ``dataset`` to GPU decoding; returns the ``GpuFinisher`` for the batches, or None (CPU path)."""
    reason = unavailable_reason()
    if reason is None and not hasattr(dataset, "decode_on_gpu"):
        reason = f"{type(dataset).__name__} has no JPEG files to decode"
    if reason is not None:
        if log is not None:
            log.warning("data.decode=gpu: %s; decoding on the CPU instead", reason)
        return None
    dataset.decode_on_gpu = True
    return GpuFinisher(torch.device("cuda", torch.cuda.current_device()))


def crop_for_gpu(data, name, out, *, scale, generator, max_pixels):
    """A worker's item in GPU mode: a ``JpegCrop``, or the CPU-decoded crop of a non-JPEG file, or None."""
    from .decode import _warn, decode_random_crop

    try:
        c = jpeg_crop(data, name, out, scale=scale, generator=generator, max_pixels=max_pixels)
    except Exception as err:
        _warn(name, err)
        return None
    if c is not None:
        return c
    src = io.BytesIO(data)
    src.name = name
    return decode_random_crop(src, out, scale=scale, generator=generator, max_pixels=max_pixels)
