"""HRDA's debug outputs for ``dida test`` / ``dida infer --hrda-out {lr,hr,att}`` (hrda_mic.md 1.7), and
input alignment for HRDA inference on images of any size.

- ``lr``: the context branch alone (the reference's fixed attention 0), ``hr``: the detail branch alone
  (fixed attention 1): class logits, evaluated and written like any prediction;
- ``att``: ``sum_k a_k softmax(z^F)_k``, one channel in [0, 1], written as an 8-bit image (x255). As the
  reference (quirk Q24), no softmax is taken over it; slide windows average it like logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dida.errors import ConfigError
from dida.models.base import BaseSegmentor, SegmentorOutput

__all__ = ["HRDA_OUTPUTS", "AlignedInput", "align_input", "attention_image", "hrda_branch"]

HRDAOut = Literal["lr", "hr", "att"]
# --hrda-out value -> HRDASegmentor.branch name (the reference's LR / HR / ATT).
HRDA_OUTPUTS: dict[str, Literal["context", "detail", "attention"]] = {
    "lr": "context", "hr": "detail", "att": "attention"}


def hrda_branch(model: BaseSegmentor, which: str, *, source: str) -> BaseSegmentor:
    """The segmentor whose logits are HRDA's ``which`` output (``HRDA_OUTPUTS``).

    Raises:
        ConfigError: ``model`` is not an HRDA segmentor (``source`` names where it came from).
    """
    from dida.models.hrda import HRDASegmentor

    if which not in HRDA_OUTPUTS:
        raise ConfigError(f"--hrda-out must be one of {', '.join(HRDA_OUTPUTS)}, got {which!r}.")
    if not isinstance(model, HRDASegmentor):
        raise ConfigError(
            f"--hrda-out {which}: {source} holds a {type(model).__name__}, not an HRDA model "
            "(model.segmentor=hrda); the context/detail/attention outputs exist only for HRDA checkpoints.")
    return model.branch(HRDA_OUTPUTS[which])


class AlignedInput(BaseSegmentor):
    """Pads inputs at the bottom/right to a multiple of ``multiple`` (0 = the mean colour after
    normalisation, as mmseg's Pad) and crops the logits back: HRDA needs input sizes that are multiples of
    one context cell (8 px), which a keep-ratio resize of an arbitrary image rarely gives.

    ``logits(img)`` is exact for aligned inputs (no padding); otherwise the context also sees the pad.
    """

    def __init__(self, model: BaseSegmentor, *, multiple: int) -> None:
        super().__init__()
        self.model = model
        self.multiple = int(multiple)

    @property
    def backbone(self) -> torch.nn.Module:  # type: ignore[override]
        return self.model.backbone

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def _pad(self, img: Tensor) -> Tensor:
        m = self.multiple
        h, w = img.shape[-2:]
        return F.pad(img, (0, (-w) % m, 0, (-h) % m))

    def forward(self, img: Tensor) -> SegmentorOutput:
        return self.predict(img)

    def predict(self, img: Tensor) -> SegmentorOutput:
        """The wrapped model's ``predict`` on the padded input (logits on the padded grid)."""
        return self.model.predict(self._pad(img))

    def logits(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        return self.model.logits(self._pad(img))[..., :h, :w]


def align_input(model: BaseSegmentor) -> BaseSegmentor:
    """``model`` wrapped in ``AlignedInput`` when it declares an ``alignment`` > 1 (HRDA), else itself."""
    multiple = int(getattr(model, "alignment", 1))
    inner = getattr(model, "model", None)  # an HRDA branch view
    multiple = max(multiple, int(getattr(inner, "alignment", 1)))
    return AlignedInput(model, multiple=multiple) if multiple > 1 else model


@torch.no_grad()
def attention_image(model: BaseSegmentor, img: Tensor, *, out_size: Sequence[int], mode: str = "whole",
                    crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                    batched_slide: bool = False) -> np.ndarray:
    """The attention output of an image as an 8-bit map (x255, rounded down like the reference's cast).

    Args:
        model: ``hrda_branch(..., "att")`` (optionally ``align_input``-wrapped), in eval mode.
        img: ``[1, 3, h, w]`` after the test pipeline.
        out_size: the original (height, width).
        mode, crop_size, stride, batched_slide: as ``dida.models.inference``.

    Returns:
        ``[H, W]`` uint8.
    """
    from dida.models.inference import slide_logits
    from dida.models.ops import resize

    if mode == "slide":
        if crop_size is None or stride is None:
            raise ValueError("slide inference needs crop_size and stride")
        att = slide_logits(model, img, crop_size, stride, batched=batched_slide)
    else:
        att = model.logits(img)
    att = resize(att.float(), tuple(out_size))[0, 0]
    return (att.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
