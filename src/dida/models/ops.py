"""Small tensor operations shared by the models, the training step and the DIDA terms."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize"]


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``[B, C, h, w]`` to ``size`` (align_corners=False), as mmseg's ``resize``.

    Returns ``x`` itself (no copy) when it already has that size; the dtype is kept (callers that need
    float32, e.g. for a loss, convert first).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
