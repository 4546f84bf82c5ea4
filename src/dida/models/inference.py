"""Whole-image and sliding-window inference for any segmentor (``dida.models.base.BaseSegmentor``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from dida.models.base import BaseSegmentor
from dida.models.ops import resize

__all__ = ["inference", "slide_logits"]


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or (height, width); got {v}")
    return v  # type: ignore[return-value]


def slide_logits(
    model: BaseSegmentor, img: torch.Tensor, crop_size: int | Sequence[int], stride: int | Sequence[int]
) -> torch.Tensor:
    """Sliding-window logits at the input size, averaged over overlapping windows (mmseg grid).

    img [B, 3, H, W] -> [B, C, H, W]. Windows start at multiples of the stride and are clamped to the
    image; each window's logits are resized to the window size and summed; the sum is divided by the
    per-pixel window count.
    """
    h_crop, w_crop = _pair(crop_size, "crop_size")
    h_stride, w_stride = _pair(stride, "stride")
    b, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((b, model.num_classes, h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * h_stride + h_crop, h_img)
            x2 = min(wi * w_stride + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            preds[:, :, y1:y2, x1:x2] += model.logits(img[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def inference(
    model: BaseSegmentor,
    img: torch.Tensor,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Class probabilities as the reference test loop computes them.

    Logits (whole image, or averaged sliding windows) are resized to the input size, then to
    ``out_size`` (the original image size; two-step resize as mmseg), then softmax over classes.
    Runs under ``torch.no_grad``; the caller decides train/eval mode (normally ``model.eval()``).
    Channels-last inputs are accepted as they are.

    Args:
        model: the segmentor.
        img: normalised images [B, 3, H, W].
        mode: ``"whole"`` or ``"slide"``.
        crop_size, stride: window size and step (int or (h, w)), required for ``"slide"``.
        out_size: (height, width) of the output; default the input size.

    Returns:
        probs [B, C, *out_size] (or [B, C, H, W]), in the dtype of the logits.
    """
    with torch.no_grad():
        if mode == "whole":
            logits = model.logits(img)
        elif mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("slide inference needs crop_size and stride")
            logits = slide_logits(model, img, crop_size, stride)
        else:
            raise ValueError(f"unknown inference mode {mode!r}; use 'whole' or 'slide'")
        if out_size is not None:
            logits = resize(logits, out_size)
        return logits.softmax(dim=1)
