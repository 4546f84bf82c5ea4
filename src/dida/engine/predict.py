"""Inference on your own images: the images of a folder and the prediction of one image (spec 10).

For every image: OpenCV decode (BGR) -> test pipeline (keep-ratio resize to ``img_scale``, normalise)
-> whole inference -> logits resized to the input size, then to the original size -> softmax ->
argmax. ``dida infer`` (``dida.commands.infer``) writes ``<stem>_pred.png`` (``uint8(img_BGR * (1 -
opacity) + colour_BGR * opacity)``, the mmseg ``show_result`` blend, ``dida.visualize.overlay``) and
``<stem>_labelTrainIds.png`` (raw train ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dida.errors import DataError
from dida.runtime import autocast

if TYPE_CHECKING:
    from torch import nn

__all__ = ["IMAGE_SUFFIXES", "list_images", "predict_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_OUTPUT_SUFFIXES = ("_pred.png", "_labelTrainIds.png")


@torch.no_grad()
def predict_image(
    model: nn.Module,
    img_bgr: np.ndarray,
    *,
    img_scale: Sequence[int] = (1024, 512),
    device: str | torch.device = "cpu",
    amp: str = "off",
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
) -> np.ndarray:
    """Predict the train-id map of one BGR image at its original size.

    Args:
        model: a ``Segmentor`` in eval mode on ``device``.
        img_bgr: ``[H, W, 3]`` uint8 BGR.
        img_scale: (long, short) keep-ratio test scale.

    Returns:
        ``[H, W]`` uint8 train ids.
    """
    from dida.data.transforms import TestPipeline
    from dida.models import inference

    device = torch.device(device)
    img = TestPipeline(tuple(img_scale))(img_bgr).to(device)
    with autocast(device, amp):
        probs = inference(model, img[None], mode=mode, crop_size=crop_size, stride=stride,
                          out_size=tuple(img_bgr.shape[:2]))
    return probs.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


def list_images(path: str | Path, *, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """A single image file, or the images in a folder (sorted; sub-folders when ``recursive``).

    Files that look like this command's own outputs (``*_pred.png``, ``*_labelTrainIds.png``) and files
    under ``exclude`` (the output folder) are left out.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such image file or folder.")
    pattern = "**/*" if recursive else "*"
    exclude_resolved = exclude.resolve() if exclude is not None else None
    if exclude_resolved is not None and path.resolve() not in exclude_resolved.parents:
        exclude_resolved = None  # the output folder is not below the input folder (it may be the folder itself)
    files = []
    for f in sorted(path.glob(pattern)):
        if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES or f.name.endswith(_OUTPUT_SUFFIXES):
            continue
        if exclude_resolved is not None and exclude_resolved in f.resolve().parents:
            continue
        files.append(f)
    return files
