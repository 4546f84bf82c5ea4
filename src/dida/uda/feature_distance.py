"""ImageNet feature distance on thing classes (spec 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dida.constants import IGNORE_INDEX

__all__ = ["downscale_label_ratio", "feature_distance_loss", "thing_mask"]


def downscale_label_ratio(labels: Tensor, scale: int, min_ratio: float, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Downscale a label map by majority vote with a minimum purity.

    The ignore label becomes an extra class ``num_classes``; the one-hot map is average-pooled with a
    ``scale`` x ``scale`` kernel (stride ``scale``). A cell takes the winning class, or ``ignore_index``
    when the winner is the ignore class or its fraction is below ``min_ratio``.

    Args:
        labels: [B, H, W] long, values in [0, num_classes) or ``ignore_index``.
        scale: pooling factor (> 0); the output is [B, H // scale, W // scale].
        min_ratio: minimal fraction of the winning class.
        num_classes: number of real classes.

    Returns:
        [B, H // scale, W // scale] long.
    """
    if scale < 1:
        raise ValueError(f"downscale_label_ratio: scale must be >= 1, got {scale}")
    out = torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels)
    one_hot = F.one_hot(out, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio = F.avg_pool2d(one_hot, kernel_size=scale, stride=scale)
    best, cls = torch.max(ratio, dim=1)
    bad = (cls == num_classes) | (best < min_ratio)
    return torch.where(bad, torch.full_like(cls, ignore_index), cls)


def thing_mask(labels: Tensor, scale: int, min_ratio: float, num_classes: int, classes: Sequence[int],
               ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cells of the downscaled label map (``downscale_label_ratio``) whose class is in ``classes``.

    Args:
        labels: [B, H, W] long.

    Returns:
        [B, H // scale, W // scale] bool.
    """
    cells = downscale_label_ratio(labels, scale, min_ratio, num_classes, ignore_index)
    mask = torch.zeros_like(cells, dtype=torch.bool)
    for c in classes:  # a handful of comparisons on the small map; no host-to-device copy
        mask |= cells == int(c)
    return mask


def feature_distance_loss(student_feat: Tensor, imnet_feat: Tensor, mask: Tensor | None = None,
                          weight: float = 0.005, empty: Literal["zero", "nan"] = "zero") -> Tensor:
    """``weight * mean over masked cells of ||f_student - f_imnet||_2`` (L2 over channels).

    Runs without host synchronisation (the masked mean is a weighted sum over all cells).

    Args:
        student_feat: [B, C, h, w] student features (with grad).
        imnet_feat: [B, C, h, w] frozen ImageNet features.
        mask: [B, h, w] bool or None (all cells).
        weight: loss weight (reference 0.005).
        empty: what an empty mask gives. "zero": 0, connected to the graph so backward works.
            "nan": the reference's NaN (mean of an empty tensor); its gradient is zero.

    Returns:
        Scalar loss.
    """
    dist = torch.linalg.vector_norm(student_feat.float() - imnet_feat.float(), ord=2, dim=1)
    if mask is None:
        return weight * dist.mean()
    if mask.shape != dist.shape:
        raise ValueError(f"feature_distance_loss: mask {tuple(mask.shape)} does not match the feature map "
                         f"{tuple(dist.shape)}")
    m = mask.to(dist.dtype)
    count = m.sum()
    # The division uses clamp(min=1) so that the unused branch of `where` never back-propagates 0/0.
    mean = (dist * m).sum() / count.clamp(min=1)
    if empty == "nan":
        # Reference: the mean of an empty selection is NaN; no gradient reaches the features.
        fallback = torch.full_like(mean, float("nan"))
    elif empty == "zero":
        fallback = mean * 0
    else:
        raise ValueError(f"feature_distance_loss: empty must be 'zero' or 'nan', got {empty!r}")
    return weight * torch.where(count > 0, mean, fallback)
