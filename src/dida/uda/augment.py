"""Batched strong (and the optional weak) augmentation of DACS, driven by an explicit ``torch.Generator``.

The maths is the reference's (spec 4.4), which used kornia 0.5.8's ``ColorJitter``:

- brightness ``b ~ U[1-s, 1+s]``, applied as an ADDITIVE shift: ``x <- clamp(x + (b - 1), 0, 1)``;
- contrast ``c ~ U[1-s, 1+s]``: ``x <- clamp(x * c, 0, 1)``;
- saturation ``t ~ U[1-s, 1+s]``: in HSV (hue in radians), ``S <- clamp(S * t, 0, 1)``;
- hue ``h ~ U[-s, s]``: ``H <- fmod(H + 2 pi h, 2 pi)``;
- the four ops in the order of one ``randperm(4)``. The reference calls the transform once per image,
  so each image has its own order and factors.

Newer kornia changed ``ColorJitter`` (multiplicative brightness, torchvision semantics), so the ops are
written here on top of ``kornia.color.rgb_to_hsv``/``hsv_to_rgb``. The Gaussian blur uses the kernel
size rule ``floor(ceil(0.1 D) - 0.5 + ceil(0.1 D) mod 2)`` (51 for 512), one sigma per image drawn
from U(0.15, 1.15), a separable normalised kernel ``exp(-x^2 / 2 sigma^2)`` and reflect padding.

All random numbers come from the passed generator, which must live on the CPU: the gates decide
whether work is done at all, so they are read on the host, and a CPU generator keeps that free of
device synchronisation. Inputs are never modified; every function returns new tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from dida.constants import IMG_MEAN, IMG_STD

__all__ = [
    "AugmentGates",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "color_jitter",
    "denormalize",
    "draw_gates",
    "gaussian_blur",
    "gaussian_kernel1d",
    "host_to_device",
    "jitter_factors",
    "renormalize",
    "strong_augment",
    "uniform",
    "weak_augment",
]

_HSV_EPS = 1e-6  # kornia 0.5.8's rgb_to_hsv epsilon


def _check_generator(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError("augment: pass a CPU torch.Generator (the gates are read on the host)")


@dataclass(frozen=True)
class AugmentGates:
    """The two per-iteration uniform draws of the reference (shared by every image of the batch)."""

    color_jitter: float
    blur: float


def draw_gates(generator: torch.Generator, blur: bool = True) -> AugmentGates:
    """Draw ``u_cj`` and ``u_b`` from U(0, 1) (``u_b`` is forced to 0 when blur is disabled)."""
    _check_generator(generator)
    u_cj, u_b = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    return AugmentGates(color_jitter=u_cj, blur=u_b if blur else 0.0)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small CPU tensor (random draws) to ``device`` without blocking the host on CUDA."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def denormalize(x: Tensor, mean: Sequence[float] = IMG_MEAN, std: Sequence[float] = IMG_STD) -> Tensor:
    """[B, 3, H, W] normalised image -> RGB in [0, 1] (``(x * std + mean) / 255``), a new tensor."""
    # Per channel with Python scalars: no host-to-device copy of the constants.
    return torch.stack([(x[:, c] * std[c] + mean[c]) / 255.0 for c in range(x.shape[1])], dim=1)


def renormalize(x: Tensor, mean: Sequence[float] = IMG_MEAN, std: Sequence[float] = IMG_STD) -> Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> normalised image (``(x * 255 - mean) / std``), a new tensor."""
    return torch.stack([(x[:, c] * 255.0 - mean[c]) / std[c] for c in range(x.shape[1])], dim=1)


def _per_sample(f: Tensor | float, x: Tensor) -> Tensor | float:
    if not isinstance(f, Tensor):
        return float(f)
    f = f.to(dtype=x.dtype)
    return f.view(-1, *([1] * (x.dim() - 1))) if f.dim() else f


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """kornia 0.5.8 ColorJitter brightness: ``clamp(x + (factor - 1), 0, 1)``. x: [B, 3, H, W] in [0, 1]."""
    return (x + (_per_sample(factor, x) - 1.0)).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """``clamp(x * factor, 0, 1)``. x: [B, 3, H, W] in [0, 1]; factor scalar or [B]."""
    return (x * _per_sample(factor, x)).clamp(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Scale the HSV saturation: ``S <- clamp(S * factor, 0, 1)``. x: [B, 3, H, W] RGB in [0, 1]."""
    hsv = kornia.color.rgb_to_hsv(x, eps=_HSV_EPS)
    h, s, v = hsv.unbind(dim=-3)
    s = (s * _per_sample(factor, s)).clamp(0.0, 1.0)
    return kornia.color.hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def adjust_hue(x: Tensor, factor: Tensor | float) -> Tensor:
    """Rotate the hue: ``H <- fmod(H + 2 pi factor, 2 pi)``, factor in [-0.5, 0.5]. x: [B, 3, H, W]."""
    hsv = kornia.color.rgb_to_hsv(x, eps=_HSV_EPS)
    h, s, v = hsv.unbind(dim=-3)
    h = torch.fmod(h + 2.0 * math.pi * _per_sample(factor, h), 2.0 * math.pi)
    return kornia.color.hsv_to_rgb(torch.stack((h, s, v), dim=-3))


_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """``n`` float64 draws from U(low, high) on the CPU generator."""
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def jitter_factors(batch: int, strength: float, generator: torch.Generator) -> list[Tensor]:
    """Per-image factors of kornia 0.5.8 ``ColorJitter(s, s, s, s)``: four float64 ``[B]`` CPU tensors.

    Brightness ~ U[max(0, 1-s), min(1+s, 2)] (kornia bounds it to [0, 2]); contrast and saturation ~
    U[max(0, 1-s), 1+s]; hue ~ U[-min(s, 0.5), min(s, 0.5)]. Drawn in that order from ``generator``.
    """
    low = max(0.0, 1.0 - strength)
    factors = [uniform(batch, low, min(1.0 + strength, 2.0), generator)]
    factors += [uniform(batch, low, 1.0 + strength, generator) for _ in range(2)]
    hue_s = min(strength, 0.5)
    factors.append(uniform(batch, -hue_s, hue_s, generator))
    return factors


def color_jitter(x: Tensor, strength: float, generator: torch.Generator,
                 mean: Sequence[float] = IMG_MEAN, std: Sequence[float] = IMG_STD, *,
                 one_order: bool = False) -> Tensor:
    """Colour jitter of normalised images with per-image factors (``jitter_factors``).

    The four ops run in a random order: one order per image (what DACS's per-image calls give), or with
    ``one_order`` one order for the whole batch (kornia's ``ColorJitter`` called once on a batch, as MIC's
    augmentation does). The factors are drawn first, then the order(s).

    Args:
        x: [B, 3, H, W] normalised images (not modified).
        strength: s (see ``jitter_factors``).
        generator: CPU generator.
        one_order: one op order for the whole batch.

    Returns:
        [B, 3, H, W] jittered normalised images.
    """
    _check_generator(generator)
    batch = x.shape[0]
    factors_dev = [host_to_device(f.float(), x.device) for f in jitter_factors(batch, strength, generator)]
    rgb = denormalize(x.float(), mean, std)
    if one_order:
        y = rgb
        for k in torch.randperm(4, generator=generator).tolist():
            y = _OPS[k](y, factors_dev[k])
        return renormalize(y, mean, std).to(x.dtype)
    orders = [torch.randperm(4, generator=generator).tolist() for _ in range(batch)]
    out = []
    for b in range(batch):
        y = rgb[b:b + 1]
        for k in orders[b]:
            y = _OPS[k](y, factors_dev[k][b:b + 1])
        out.append(y)
    return renormalize(torch.cat(out), mean, std).to(x.dtype)


def blur_kernel_size(size: int) -> int:
    """The reference's kernel size rule: ``floor(ceil(0.1 D) - 0.5 + ceil(0.1 D) mod 2)`` (51 for 512)."""
    c = math.ceil(0.1 * size)
    return int(math.floor(c - 0.5 + c % 2))


def gaussian_kernel1d(size: int, sigma: Tensor) -> Tensor:
    """Normalised 1-D Gaussians ``exp(-x^2 / 2 sigma^2)`` with centred offsets (kornia's convention).

    Args:
        size: kernel length.
        sigma: [N] standard deviations.

    Returns:
        [N, size] kernels, each summing to 1.
    """
    x = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-x.pow(2)[None, :] / (2.0 * sigma.pow(2)[:, None]))
    return g / g.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per image and reflect padding.

    Args:
        x: [B, C, H, W] images (not modified).
        sigma: [B] standard deviations (same for both axes).

    Returns:
        [B, C, H, W] blurred images.
    """
    batch, ch, height, width = x.shape
    ky, kx = blur_kernel_size(height), blur_kernel_size(width)
    sig = host_to_device(sigma.float(), x.device)
    wy = gaussian_kernel1d(ky, sig).repeat_interleave(ch, dim=0).to(x.dtype)  # [B*C, ky]
    wx = gaussian_kernel1d(kx, sig).repeat_interleave(ch, dim=0).to(x.dtype)
    y = x.reshape(1, batch * ch, height, width)
    # kornia pads (k - 1) // 2 before and k // 2 after; identical for odd sizes.
    y = F.pad(y, [(kx - 1) // 2, kx // 2, (ky - 1) // 2, ky // 2], mode="reflect")
    y = F.conv2d(y, wy.view(batch * ch, 1, ky, 1), groups=batch * ch)
    y = F.conv2d(y, wx.view(batch * ch, 1, 1, kx), groups=batch * ch)
    return y.reshape(batch, ch, height, width)


def _maybe_jitter_and_blur(x: Tensor, gates: AugmentGates, generator: torch.Generator, strength: float,
                           prob: float, mean: Sequence[float], std: Sequence[float],
                           blur_first: bool) -> Tensor:
    _check_generator(generator)
    jitter = gates.color_jitter > prob
    blur = gates.blur > 0.5

    def do_blur(y: Tensor) -> Tensor:
        sigma = uniform(y.shape[0], 0.15, 1.15, generator)
        return gaussian_blur(y, sigma)

    out = x
    if blur_first and blur:
        out = do_blur(out)
    if jitter:
        out = color_jitter(out, strength, generator, mean, std)
    if not blur_first and blur:
        out = do_blur(out)
    return out if out is not x else x.clone()


def strong_augment(images: Tensor, gates: AugmentGates, generator: torch.Generator,
                   color_jitter_strength: float = 0.2, color_jitter_prob: float = 0.2,
                   mean: Sequence[float] = IMG_MEAN, std: Sequence[float] = IMG_STD) -> Tensor:
    """The reference's strong augmentation of the mixed images: colour jitter, then Gaussian blur.

    Jitter runs when ``gates.color_jitter > color_jitter_prob``, blur when ``gates.blur > 0.5``;
    factors and sigmas are drawn per image from ``generator``.

    Args:
        images: [B, 3, H, W] normalised images (not modified).

    Returns:
        [B, 3, H, W] a new tensor.
    """
    return _maybe_jitter_and_blur(images, gates, generator, color_jitter_strength, color_jitter_prob,
                                  mean, std, blur_first=False)


def weak_augment(images: Tensor, gates: AugmentGates, generator: torch.Generator,
                 color_jitter_strength: float = 0.2, color_jitter_prob: float = 0.2,
                 mean: Sequence[float] = IMG_MEAN, std: Sequence[float] = IMG_STD) -> Tensor:
    """DIDA's intended weak target view (spec 6.4, off in the reference): blur, then colour jitter.

    Same gates semantics and strengths as ``strong_augment``, no mixing. Never aliases or modifies
    ``images`` (the reference's version would have, had it run).

    Args:
        images: [B, 3, H, W] normalised images.

    Returns:
        [B, 3, H, W] a new tensor.
    """
    return _maybe_jitter_and_blur(images, gates, generator, color_jitter_strength, color_jitter_prob,
                                  mean, std, blur_first=True)
