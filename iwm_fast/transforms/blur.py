"""Gaussian blur with one sigma per sample, as two separable grouped convolutions (no per-sample loop)."""
import torch
import torch.nn.functional as F


def gaussian_kernels(sigma, radius, dtype=torch.float32):
    """[B, 2*radius+1] normalised 1-D Gaussians; sigma <= 0 gives a unit impulse (exact identity)."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=dtype)
    s = sigma.to(dtype).view(-1, 1)
    on = s > 0
    w = torch.exp(-0.5 * (t / torch.where(on, s, torch.ones_like(s))) ** 2)
    w = torch.where(on, w, (t == 0).to(dtype).expand_as(w))
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(x, sigma, radius):
    """Blur [B, C, H, W] with per-sample ``sigma`` [B]; borders are reflected (like torchvision's blur).

    The kernel is cut to the image size where the image is smaller than the kernel.
    """
    B, C, H, W = x.shape
    if radius <= 0:
        return x
    planes = x.reshape(1, B * C, H, W)
    rw, rh = min(radius, W - 1), min(radius, H - 1)
    if rw > 0:
        k = gaussian_kernels(sigma, rw, x.dtype).repeat_interleave(C, dim=0).view(B * C, 1, 1, 2 * rw + 1)
        planes = F.conv2d(F.pad(planes, (rw, rw, 0, 0), mode="reflect"), k, groups=B * C)
    if rh > 0:
        k = gaussian_kernels(sigma, rh, x.dtype).repeat_interleave(C, dim=0).view(B * C, 1, 2 * rh + 1, 1)
        planes = F.conv2d(F.pad(planes, (0, 0, rh, rh), mode="reflect"), k, groups=B * C)
    return planes.reshape(B, C, H, W)
