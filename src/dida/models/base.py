"""The model protocol: what the training step, evaluation, inference, bank building and checkpoint loading
expect of a backbone and of a segmentor.

A **backbone** is an ``nn.Module`` whose ``forward(img [B, 3, H, W])`` returns a list of feature maps,
finest first, and which declares ``out_channels`` (one int per map) and ``strides`` (the map's stride
relative to the input, e.g. ``(4, 8, 16, 32)`` for MiT). How it reads its published weight files is declared
next to its builder in ``dida.models.registry`` (``WeightFormat``).

A **segmentor** derives from ``BaseSegmentor``. It owns:

- ``forward(img)``: the training forward, returning a ``SegmentorOutput`` (``logits`` at the network's
  resolution; ``features`` the backbone maps that the feature distance compares; ``embedding`` the decoder
  feature DIDA's instance bank works on, or None);
- ``loss_terms(output, label, weight)`` / ``loss(...)``: its training loss for a label map at full crop
  size (the step never computes a segmentation loss itself);
- ``predict(img)``: the test-time forward used by the EMA teacher and by inference (whole image, no random
  crops); ``logits(img)`` resizes its logits to the input size;
- ``extract_features(img)``: the backbone maps that the feature distance compares (the frozen ImageNet
  model is a segmentor of the same kind, so both sides see the same input scale).

Nothing here knows MiT, the DAFormer head or a training method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dida.constants import IGNORE_INDEX
from dida.models.losses import seg_ce
from dida.models.ops import resize

__all__ = ["BaseSegmentor", "SegmentorOutput", "backbone_of"]


@dataclass
class SegmentorOutput:
    """What a segmentor's forward returns (all at the resolution the network produces).

    Attributes:
        features: the backbone maps the feature distance compares, finest first, e.g. MiT's four maps
            ``[B, C_i, H/2^(i+2), W/2^(i+2)]``.
        embedding: the decoder feature DIDA's instance term uses, ``[B, D, h, w]`` (DAFormer: the
            256-channel ReLU output of the fusion, before dropout, at 1/4 resolution), or None when the
            model has none.
        logits: ``[B, num_classes, h, w]``.
    """

    features: list[Tensor]
    embedding: Tensor | None
    logits: Tensor


class BaseSegmentor(nn.Module):
    """Base class of segmentors (see the module docstring for the contract).

    Subclasses set ``self.backbone`` and implement ``forward`` and ``num_classes``; the defaults of the
    other methods fit a single-output model whose loss is the mmseg 0.16 cross-entropy of its logits
    resized to the label size.
    """

    backbone: nn.Module
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int | None:
        """Channels D of ``SegmentorOutput.embedding`` (None when the model returns no embedding)."""
        return None

    def forward(self, img: Tensor) -> SegmentorOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, img: Tensor) -> SegmentorOutput:
        """Test-time forward (EMA teacher, inference): the training forward unless a model differs."""
        return self(img)

    def logits(self, img: Tensor) -> Tensor:
        """``predict(img).logits`` resized to the input size (bilinear, align_corners=False)."""
        return resize(self.predict(img).logits, img.shape[-2:])

    def extract_features(self, img: Tensor) -> list[Tensor]:
        """The backbone maps that the feature distance compares (default: ``backbone(img)``)."""
        return self.backbone(img)

    def loss_terms(self, output: SegmentorOutput, label: Tensor, weight: Tensor | None = None
                   ) -> dict[str, Tensor]:
        """The weighted parts of the training loss; ``"seg"`` is the main one, the sum is the loss.

        Args:
            output: this model's forward output.
            label: ``[B, H, W]`` long at full crop size, ``ignore_index`` allowed.
            weight: ``[B, H, W]`` per-pixel weights or None.
        """
        logits = resize(output.logits.float(), label.shape[-2:])
        return {"seg": seg_ce(logits, label, weight, ignore_index=self.ignore_index)}

    def loss(self, output: SegmentorOutput, label: Tensor, weight: Tensor | None = None) -> Tensor:
        """The scalar training loss: the sum of ``loss_terms``."""
        terms = self.loss_terms(output, label, weight)
        return sum(terms.values(), torch.zeros((), device=label.device))  # type: ignore[return-value]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Re-draw every parameter from ``generator`` (children that define ``init_weights``)."""
        for child in self.children():
            init = getattr(child, "init_weights", None)
            if callable(init):
                init(generator)


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone of a segmentor, or the module itself when it is a bare backbone."""
    inner = getattr(model, "backbone", None)
    return inner if isinstance(inner, nn.Module) else model

