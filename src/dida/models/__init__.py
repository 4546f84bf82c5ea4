"""Models: the protocol (``base``), the tables of backbones and segmentors (``registry``), MiT, the DAFormer
head, the encoder-decoder and HRDA segmentors, and inference."""

from __future__ import annotations

from dida.models.base import BaseSegmentor, SegmentorOutput, backbone_of
from dida.models.daformer_head import DAFormerHead
from dida.models.hrda import HRDABranches, HRDAOutput, HRDASegmentor, build_hrda
from dida.models.hrda_head import HRDAHead, ScaleAttentionHead
from dida.models.inference import inference, slide_logits
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
from dida.models.registry import (
    BACKBONES,
    SEGMENTORS,
    BackboneEntry,
    SegmentorEntry,
    WeightFormat,
    build_model,
)
from dida.models.segmentor import Segmentor, build_segmentor

__all__ = [
    "BACKBONES",
    "MIT_VARIANTS",
    "SEGMENTORS",
    "BackboneEntry",
    "BaseSegmentor",
    "DAFormerHead",
    "HRDABranches",
    "HRDAHead",
    "HRDAOutput",
    "HRDASegmentor",
    "MixVisionTransformer",
    "ScaleAttentionHead",
    "Segmentor",
    "SegmentorEntry",
    "SegmentorOutput",
    "WeightFormat",
    "backbone_of",
    "build_hrda",
    "build_mit",
    "build_model",
    "build_segmentor",
    "inference",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
    "slide_logits",
]
