"""Teacher pseudo-labels and their confidence weight (spec 4.2)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confident_fraction", "pseudo_labels", "pseudo_weight"]


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


def pseudo_weight(max_prob: Tensor, threshold: float | None, ignore_top: int = 0, ignore_bottom: int = 0,
                  valid_mask: Tensor | None = None) -> Tensor:
    """The reference's per-batch scalar confidence weight, broadcast to a map.

    The weight is ONE scalar for the whole batch: the fraction of pixels (over all images) whose
    confidence is >= ``threshold``. It stays on the device (no host sync). Then the ``ignore_top``
    first and ``ignore_bottom`` last rows of every map are set to 0: don't trust pseudo-labels in
    regions with potential rectification artefacts, which can lead to a pseudo-label drift from sky
    towards building or traffic light.

    Args:
        max_prob: [B, H, W] confidence of the pseudo-labels.
        threshold: confidence threshold (reference 0.968); None gives weight 1 (MIC's
            ``mask_pseudo_threshold=None``), the rows below still zeroed.
        ignore_top: number of top rows set to 0 (0 disables).
        ignore_bottom: number of bottom rows set to 0 (0 disables).
        valid_mask: [B, (1,) H, W] or None: the weight is multiplied by it (HRDA's pseudo-label margins,
            delivered by the loader as ``valid_pseudo_mask``).

    Returns:
        [B, H, W] float weight map.
    """
    if threshold is None:
        weight = torch.ones_like(max_prob, dtype=torch.float32)
    else:
        weight = confident_fraction(max_prob, threshold).expand(max_prob.shape).clone()
    if ignore_top > 0:
        weight[:, :ignore_top, :] = 0
    if ignore_bottom > 0:
        weight[:, -ignore_bottom:, :] = 0
    if valid_mask is not None:
        weight = weight * valid_mask.reshape(weight.shape).to(weight.dtype)
    return weight
