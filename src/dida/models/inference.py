"""Whole-image and sliding-window inference for any segmentor (``dida.models.base.BaseSegmentor``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from dida.models.base import BaseSegmentor
from dida.models.ops import resize

__all__ = ["inference", "min_input_side", "slide_boxes", "slide_logits"]


def min_input_side(model: torch.nn.Module) -> int:
    """The smallest input side ``model`` can encode: its backbone's coarsest output stride (the backbone protocol's
    ``strides``; MiT: 32, where its stage-1 attention reduces the stride-4 map by 8), divided by HRDA's context
    scale; 1 for a model without a backbone that declares strides. Smaller test images are padded up to it."""
    import math

    scale, stride, m = 1.0, 1, model
    while isinstance(m, torch.nn.Module):  # an HRDA model, possibly wrapped (branch views, input alignment)
        scale = min(scale, float(getattr(m, "context_scale", 1.0)))
        strides = getattr(getattr(m, "backbone", None), "strides", None)
        if strides:
            stride = max(stride, *(int(s) for s in strides))
        m = getattr(m, "model", None)
    return math.ceil(stride / scale)


def _padded_to_minimum(model: BaseSegmentor, img: torch.Tensor) -> torch.Tensor:
    """``img`` padded at the bottom / right (zeros: the mean colour after normalisation) to the smallest size the
    model can encode; unchanged (the same tensor) when it is large enough."""
    side = min_input_side(model)
    h, w = img.shape[-2:]
    if h >= side and w >= side:
        return img
    return torch.nn.functional.pad(img, (0, max(side - w, 0), 0, max(side - h, 0)))


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or (height, width); got {v}")
    return v  # type: ignore[return-value]


def slide_boxes(
    size: Sequence[int], crop_size: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """The mmseg sliding-window grid over an image of ``size`` (height, width), row-major.

    ``n = max(size - crop + stride - 1, 0) // stride + 1`` windows per axis; window ``i`` starts at
    ``i * stride``, is clamped to end at the border and shifted back to keep the crop size (or the image
    size when the image is smaller). Returns ``(y1, y2, x1, x2)`` per window.
    """
    h_crop, w_crop = _pair(crop_size, "crop_size")
    h_stride, w_stride = _pair(stride, "stride")
    h_img, w_img = int(size[0]), int(size[1])
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * h_stride + h_crop, h_img)
            x2 = min(wi * w_stride + w_crop, w_img)
            boxes.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return boxes


def slide_logits(
    model: BaseSegmentor,
    img: torch.Tensor,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
    *,
    batched: bool = False,
) -> torch.Tensor:
    """Sliding-window logits at the input size, averaged over overlapping windows (mmseg grid).

    img [B, 3, H, W] -> [B, C, H, W]. Windows start at multiples of the stride and are clamped to the
    image; each window's logits are resized to the window size and summed; the sum is divided by the
    per-pixel window count.

    With ``batched`` all windows go through ``model.logits`` in one call (window-major: window k is
    batch rows ``k*B ... k*B+B-1``), as the reference's ``batched_slide`` (HRDA's test configuration):
    faster, more memory, and train-mode BatchNorm would see all windows at once.
    """
    b, _, h_img, w_img = img.shape
    boxes = slide_boxes((h_img, w_img), crop_size, stride)
    preds = img.new_zeros((b, model.num_classes, h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    if batched:
        windows = model.logits(torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], dim=0))
        for k, (y1, y2, x1, x2) in enumerate(boxes):
            preds[:, :, y1:y2, x1:x2] += windows[k * b:(k + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
        return preds / count
    for y1, y2, x1, x2 in boxes:
        preds[:, :, y1:y2, x1:x2] += model.logits(img[:, :, y1:y2, x1:x2])
        count[:, :, y1:y2, x1:x2] += 1
    return preds / count


# ImageNet-normalised images lie within about [-2.2, 2.7]; raw 0-255 pixels reach far beyond this.
_NORMALISED_BOUND = 20.0


def _check_normalised(img: torch.Tensor) -> None:
    """Refuse raw images: integer tensors, or values far outside the normalised range (one small sync)."""
    from dida.errors import DataError

    if not img.is_floating_point():
        raise DataError(f"inference: expected a normalised float image batch [B, 3, H, W], got {img.dtype}. "
                        "Normalise it first (dida.data.transforms.normalize, or use dida.load_model(...).predict "
                        "on the raw image).")
    peak = float(img[..., ::8, ::8].detach().abs().amax()) if img.numel() else 0.0
    if peak > _NORMALISED_BOUND:
        raise DataError(
            f"inference: the image batch reaches |x| = {peak:.0f}: it looks like raw 0-255 pixels, but the model "
            "expects ImageNet-normalised input ((x - mean) / std with mean 123.675, 116.28, 103.53 and std "
            "58.395, 57.12, 57.375, RGB). Normalise it first, or use dida.load_model(...).predict.")


def inference(
    model: BaseSegmentor,
    img: torch.Tensor,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    out_size: Sequence[int] | None = None,
    *,
    batched_slide: bool = False,
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
        batched_slide: run all sliding windows through the model in one batch (``slide_logits``).

    Returns:
        probs [B, C, *out_size] (or [B, C, H, W]), in the dtype of the logits.
    """
    _check_normalised(img)
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and img.is_floating_point() and img.dtype != weight.dtype:
        img = img.to(weight.dtype)  # a model cast to bf16 for inference (dida.runtime.inference_precision)
    with torch.no_grad():
        h, w = img.shape[-2:]
        padded = _padded_to_minimum(model, img)  # an image smaller than the model's coarsest stride
        if mode == "whole":
            logits = model.logits(padded)
        elif mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("slide inference needs crop_size and stride")
            logits = slide_logits(model, padded, crop_size, stride, batched=batched_slide)
        else:
            raise ValueError(f"unknown inference mode {mode!r}; use 'whole' or 'slide'")
        logits = logits[..., :h, :w]
        if out_size is not None:
            logits = resize(logits, out_size)
        return logits.softmax(dim=1)
