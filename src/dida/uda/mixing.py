"""ClassMix masks and mixing (spec 4.3), batched and driven by an explicit ``torch.Generator``."""

from __future__ import annotations

import torch
from torch import Tensor

from dida.constants import IGNORE_INDEX
from dida.uda.augment import host_to_device

__all__ = ["class_mix_masks", "mix", "mix_batch"]


def _draw_priorities(batch: int, num_values: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """[B, V] long: one random permutation of the label values per image (drawn on the generator)."""
    perms = [torch.randperm(num_values, generator=generator, device=generator.device) for _ in range(batch)]
    return host_to_device(torch.stack(perms), device)


def class_mix_masks(labels: Tensor, generator: torch.Generator, ignore_index: int = IGNORE_INDEX,
                    per_image: bool = False) -> Tensor:
    """ClassMix masks: for each image, half of the candidate classes are pasted.

    Reference default (``per_image=False``, the DACS quirk): every image draws from the classes
    present in the WHOLE batch, the ignore label included, so an image may pick classes it does not
    contain (or 255). ``per_image=True`` draws from the image's own classes, without the ignore label.
    Each image picks ``ceil(n / 2)`` of its ``n`` candidates uniformly without replacement.

    Runs without host synchronisation: candidates are a presence table over label values, the random
    subset is the first ``ceil(n / 2)`` candidates in the order of a per-image random permutation.

    Args:
        labels: [B, H, W] long source labels with values in [0, max(255, ignore_index)].
        generator: random source (its device is where the permutations are drawn).
        ignore_index: the ignore label.
        per_image: use each image's own classes (without ignore) instead of the batch union.

    Returns:
        [B, H, W] bool, True where the source pixel is pasted onto the target.
    """
    if labels.dim() != 3:
        raise ValueError(f"class_mix_masks: labels must be [B, H, W], got {tuple(labels.shape)}")
    batch = labels.shape[0]
    num_values = max(255, ignore_index) + 1
    flat = labels.reshape(batch, -1)
    present = torch.zeros(batch, num_values, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)
    if per_image:
        if 0 <= ignore_index < num_values:
            present[:, ignore_index] = False
    else:
        present = present.any(dim=0, keepdim=True).expand(batch, -1)
    n = present.sum(dim=1, keepdim=True)
    k = torch.div(n + 1, 2, rounding_mode="floor")  # ceil(n / 2)
    priority = _draw_priorities(batch, num_values, generator, labels.device)
    # Walk the values in the order given by each image's permutation and keep the first k present ones.
    order = priority.argsort(dim=1)
    present_sorted = torch.gather(present, 1, order)
    rank = present_sorted.long().cumsum(dim=1)
    chosen_sorted = present_sorted & (rank <= k)
    chosen = torch.zeros_like(present).scatter_(1, order, chosen_sorted)
    return torch.gather(chosen, 1, flat).reshape(labels.shape)


def mix(source: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``source`` where ``mask`` else ``target``.

    Args:
        source, target: [B, H, W] or [B, C, H, W] tensors of the same shape.
        mask: [B, H, W] bool (broadcast over the channel dim for 4-D inputs).

    Returns:
        A new tensor of the inputs' shape.
    """
    if source.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, source, target)


def mix_batch(mask: Tensor, src_img: Tensor, tgt_img: Tensor, src_label: Tensor, tgt_label: Tensor,
              tgt_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mix images, labels and pixel weights (source pixels weigh 1, target pixels their pseudo weight).

    Args:
        mask: [B, H, W] bool; src_img/tgt_img: [B, 3, H, W]; src_label/tgt_label: [B, H, W] long;
        tgt_weight: [B, H, W] float.

    Returns:
        (mixed image [B, 3, H, W], mixed label [B, H, W], mixed weight [B, H, W]).
    """
    ones = torch.ones_like(tgt_weight)
    return (mix(src_img, tgt_img, mask), mix(src_label, tgt_label, mask), mix(ones, tgt_weight, mask))
