"""Models: MiT backbone, DAFormer head, the segmentor, its builders and inference."""

from __future__ import annotations

from dida.models.daformer_head import DAFormerHead
from dida.models.mit import (
    MIT_VARIANTS,
    MixVisionTransformer,
    build_mit,
    mit_b0,
    mit_b1,
    mit_b2,
    mit_b3,
    mit_b4,
    mit_b5,
)
from dida.models.segmentor import (
    Segmentor,
    SegmentorOutput,
    build_segmentor,
    build_segmentor_from_cfg,
    inference,
    slide_logits,
)

__all__ = [
    "MIT_VARIANTS",
    "DAFormerHead",
    "MixVisionTransformer",
    "Segmentor",
    "SegmentorOutput",
    "build_mit",
    "build_segmentor",
    "build_segmentor_from_cfg",
    "inference",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
    "slide_logits",
]
