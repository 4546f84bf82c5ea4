"""MIC's block masking of images (spec 4.2; quirk Q16).

A batch ``[B, C, H, W]`` is masked with a grid of ``round(H / b) x round(W / b)`` blocks per image, each
block kept with probability ``1 - ratio``:

1. ``u ~ U(0, 1)`` of shape ``[B, 1, round(H / b), round(W / b)]``, ONE draw of that shape from the given
   generator (the reference draws the same tensor from torch's global RNG, so a CPU generator seeded
   with ``manual_seed(s)`` reproduces the reference's CPU mask after ``torch.manual_seed(s)``);
2. ``keep = u > ratio``;
3. nearest-neighbour upsampling of the grid to ``H x W`` (mmseg ``resize(..., mode='nearest')``, i.e.
   ``F.interpolate(mode="nearest")``). When ``H`` or ``W`` is not a multiple of ``b`` the blocks are of
   unequal size, exactly as the reference gives them; ``round`` is Python's (halves to even).

``mask_image`` multiplies the normalised image by the mask, so masked pixels are 0 in normalised space,
i.e. the dataset's mean colour, not black (Q16).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dida.uda.augment import host_to_device

__all__ = ["block_grid_size", "block_mask", "mask_image"]


def block_grid_size(height: int, width: int, block_size: int) -> tuple[int, int]:
    """The reference's grid ``(round(H / b), round(W / b))`` (Python ``round``: halves go to even).

    Raises:
        ValueError: a grid side would be empty (``H`` or ``W`` below ``b / 2``), or ``block_size < 1``.
    """
    if block_size < 1:
        raise ValueError(f"block_mask: block_size must be >= 1, got {block_size}")
    grid = (round(height / block_size), round(width / block_size))
    if min(grid) < 1:
        raise ValueError(f"block_mask: a {height}x{width} image has no whole {block_size}-px block "
                         f"(grid {grid}); use a smaller block_size")
    return grid


def block_mask(shape: Sequence[int], block_size: int, ratio: float, generator: torch.Generator,
               device: torch.device | str | None = None) -> Tensor:
    """A random block mask (1 = keep, 0 = masked) for a batch of images.

    Args:
        shape: the image batch's shape ``[B, C, H, W]`` (only ``B`` and the last two entries are read).
        block_size: ``b``, the nominal block side in pixels.
        ratio: ``r``, the probability that a block is masked (a block is kept where ``u > r``).
        generator: the source of the uniform draw; the draw happens on the generator's device (CPU).
        device: where the mask is returned (default: the generator's device). The small grid is copied
            there without blocking the host and upsampled there.

    Returns:
        ``[B, 1, H, W]`` float32 mask of zeros and ones.
    """
    batch, height, width = int(shape[0]), int(shape[-2]), int(shape[-1])
    grid_h, grid_w = block_grid_size(height, width, block_size)
    u = torch.rand((batch, 1, grid_h, grid_w), generator=generator, device=generator.device)
    keep = (u > ratio).float()
    if device is not None:
        keep = host_to_device(keep, torch.device(device))
    return F.interpolate(keep, size=(height, width), mode="nearest")


def mask_image(img: Tensor, mask: Tensor) -> Tensor:
    """``img * mask`` as a new tensor: masked pixels become 0 in normalised space (the mean colour).

    Args:
        img: ``[B, C, H, W]`` normalised images (not modified).
        mask: ``[B, 1, H, W]`` (broadcast over channels), on any device; moved to ``img``'s device
            without a host sync.

    Returns:
        ``[B, C, H, W]`` in ``img``'s dtype.
    """
    if mask.shape[0] != img.shape[0] or mask.shape[-2:] != img.shape[-2:]:
        raise ValueError(f"mask_image: mask {tuple(mask.shape)} does not fit the images {tuple(img.shape)}")
    return img * host_to_device(mask, img.device).to(img.dtype)
