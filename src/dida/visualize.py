"""Label maps as pictures: the palette lookup table, colourised label maps and palette overlays.

The one place that turns train ids into colours: ``dida test --save-preds``, ``dida infer``, the demo's
figures and the training debug images all use these.
"""

from __future__ import annotations

import numpy as np
import torch

from dida.constants import IGNORE_INDEX, PALETTE
from dida.errors import ConfigError

__all__ = ["colorize", "overlay", "palette_lut"]


def palette_lut(num_classes: int = len(PALETTE)) -> np.ndarray:
    """``[256, 3]`` uint8 RGB colour table: the Cityscapes palette for the first 19 ids, fixed pseudo-random
    colours for any further class, black for ``IGNORE_INDEX`` and unused ids."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: min(num_classes, len(PALETTE))] = np.asarray(PALETTE[:num_classes], dtype=np.uint8)
    if num_classes > len(PALETTE):
        extra = np.random.default_rng(0).integers(0, 256, size=(num_classes - len(PALETTE), 3))
        lut[len(PALETTE) : num_classes] = extra.astype(np.uint8)
    lut[IGNORE_INDEX] = 0
    return lut


def colorize(label: np.ndarray | torch.Tensor, num_classes: int = len(PALETTE)) -> np.ndarray:
    """Train-id map ``[H, W]`` -> RGB ``[H, W, 3]`` uint8 (palette colours; 255 -> black)."""
    label_np = label.cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return palette_lut(num_classes)[label_np.astype(np.uint8)]


def overlay(
    img_bgr: np.ndarray, label: np.ndarray, opacity: float = 0.5, num_classes: int = len(PALETTE)
) -> np.ndarray:
    """Blend palette colours over an image: ``uint8(img * (1 - opacity) + colour * opacity)``.

    Args:
        img_bgr: ``[H, W, 3]`` uint8, BGR (OpenCV order).
        label: ``[H, W]`` train ids.
        opacity: weight of the palette colour in [0, 1].

    Returns:
        ``[H, W, 3]`` uint8 BGR (float64 blend truncated to uint8, as mmseg ``show_result``).
    """
    if not 0.0 <= opacity <= 1.0:
        raise ConfigError(f"--opacity must be in [0, 1], got {opacity}.")
    colour_bgr = colorize(label, num_classes)[..., ::-1]
    return (img_bgr.astype(np.float64) * (1.0 - opacity) + colour_bgr * opacity).astype(np.uint8)
