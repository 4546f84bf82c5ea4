"""Segmentation losses with mmseg 0.16 semantics (spec 4.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dida.constants import IGNORE_INDEX

__all__ = ["seg_accuracy", "seg_ce"]


def seg_ce(logits: Tensor, labels: Tensor, weight: Tensor | None = None,
           ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-pixel cross-entropy, optionally weighted, averaged over ALL pixels.

    mmseg 0.16 semantics: ignored pixels contribute a loss of 0 but still count in the denominator,
    so the result is ``sum(w * ce) / (B * H * W)``.

    Args:
        logits: [B, C, H, W] raw scores, already resized to the label size. Computed in float32.
        labels: [B, H, W] long, ``ignore_index`` allowed.
        weight: [B, H, W] per-pixel weights or None (all ones).
        ignore_index: label value that is ignored.

    Returns:
        Scalar loss tensor.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(
            f"seg_ce: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in size")
    loss = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=ignore_index)
    if weight is not None:
        loss = loss * weight
    return loss.mean()


@torch.no_grad()
def seg_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Percentage of ALL pixels (ignored ones included) whose argmax equals the label (mmseg ``acc_seg``).

    Args:
        logits: [B, C, H, W]; labels: [B, H, W] long.

    Returns:
        Scalar float tensor in [0, 100] on the logits' device.
    """
    pred = logits.argmax(dim=1)
    return (pred == labels).float().mean() * 100.0
