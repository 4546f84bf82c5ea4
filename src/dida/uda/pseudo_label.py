"""Teacher pseudo-labels and their confidence weight (spec 4.2)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pseudo_labels", "confident_fraction", "pseudo_weight"]


def pseudo_labels(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels and their confidence.

    Args:
        probs: [B, C, H, W] class probabilities (softmax of the teacher logits at label size).

    Returns:
        labels: [B, H, W] long argmax; max_prob: [B, H, W] the maximal probability.
    """
    max_prob, labels = torch.max(probs, dim=1)
    return labels, max_prob


def confident_fraction(max_prob: Tensor, threshold: float) -> Tensor:
    """Scalar fraction of ALL pixels of the batch whose confidence is >= ``threshold`` (on the device)."""
    return (max_prob >= threshold).float().mean()


def pseudo_weight(max_prob: Tensor, threshold: float, ignore_top: int = 0, ignore_bottom: int = 0) -> Tensor:
    """The reference's per-batch scalar confidence weight, broadcast to a map.

    The weight is ONE scalar for the whole batch: the fraction of pixels (over all images) whose
    confidence is >= ``threshold``. It stays on the device (no host sync). Then the ``ignore_top``
    first and ``ignore_bottom`` last rows of every map are set to 0: don't trust pseudo-labels in
    regions with potential rectification artefacts, which can lead to a pseudo-label drift from sky
    towards building or traffic light.

    Args:
        max_prob: [B, H, W] confidence of the pseudo-labels.
        threshold: confidence threshold (reference 0.968).
        ignore_top: number of top rows set to 0 (0 disables).
        ignore_bottom: number of bottom rows set to 0 (0 disables).

    Returns:
        [B, H, W] float weight map.
    """
    fraction = confident_fraction(max_prob, threshold)
    weight = fraction.expand(max_prob.shape).clone()
    if ignore_top > 0:
        weight[:, :ignore_top, :] = 0
    if ignore_bottom > 0:
        weight[:, -ignore_bottom:, :] = 0
    return weight
