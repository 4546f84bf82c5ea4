"""HRDA's head: a DAFormer head shared by both scales plus the scale-attention head (spec hrda_mic.md 1.2).

Module paths match the mmcv checkpoint keys of HRDA / MIC(HRDA): ``head.*`` (the 58 DAFormer-head tensors)
and ``scale_attention.{embed_layers.{i}.proj, fuse_layer.{conv, bn}, conv_seg}`` (16 tensors).

The reference builds the attention head as a second DAFormer head whose ``aspp`` fusion is replaced by a
1x1 ``ConvModule``; the maintainer calls it the SegFormer-style attention decoder (lhoyer/HRDA#4). The
legacy mmcv class names ``MultiResEncoderDecoder`` / ``MultiResAttentionWrapper`` only appear in mmcv
config text, never in state-dict keys, so loading a checkpoint needs nothing for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dida.models.daformer_head import DAFormerHead

__all__ = ["HRDAHead", "ScaleAttentionHead"]


class ScaleAttentionHead(DAFormerHead):
    """The DAFormer head with a 1x1 ConvModule fusion: per-level Linear embeddings, upsampled to level 0,
    concatenated, 1x1 conv + BN + ReLU, Dropout2d, classifier.

    ``forward(features)`` returns ``(embedding [B, D, h_0, w_0], logits [B, num_outputs, h_0, w_0])``: the
    attention *logits* (the sigmoid is applied by ``HRDAHead.attention``).

    Args:
        in_channels: channels of the backbone maps.
        channels: width D of the embeddings and of the fusion (``attention_embed_dim``, 256).
        num_outputs: attention channels (the class count when class-wise, else 1).
        dropout_ratio: Dropout2d before the classifier (the DAFormer head's, 0.1).
        init: draw the reference initialisation now (else call ``init_weights`` later).
    """

    def __init__(self, in_channels: Sequence[int], *, channels: int, num_outputs: int, dropout_ratio: float,
                 init: bool = True) -> None:
        super().__init__(in_channels, channels, num_outputs, dilations=(), dropout_ratio=dropout_ratio, init=init,
                         fusion="conv")

    @property
    def num_outputs(self) -> int:
        return self.num_classes


class HRDAHead(nn.Module):
    """The segmentation head shared by both scales and the attention head on the context scale.

    ``forward(context_features, detail_features)`` returns ``(context_embedding [B, D, h, w],
    context_logits [B, C, h, w], detail_logits [B', C, h', w'], attention [B, K, h, w] or a float)`` in
    the reference's call order (head on the context, head on the detail, attention on the context). The
    fusion of the two scales depends on the detail window and lives in ``dida.models.hrda``.

    Args:
        head: the DAFormer head, run on both scales.
        scale_attention: the attention head, or None with ``fixed_attention``.
        fixed_attention: a constant attention in [0, 1] instead of the learned head (the ``fixedatt``
            ablation; None in every preset).
    """

    def __init__(self, head: DAFormerHead, scale_attention: ScaleAttentionHead | None, *,
                 fixed_attention: float | None) -> None:
        super().__init__()
        if (scale_attention is None) == (fixed_attention is None):
            raise ValueError("HRDAHead needs exactly one of scale_attention and fixed_attention")
        self.head = head
        if scale_attention is not None:
            self.scale_attention = scale_attention
        self.fixed_attention = None if fixed_attention is None else float(fixed_attention)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def channels(self) -> int:
        return self.head.channels

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        self.head.init_weights(generator)
        if self.fixed_attention is None:
            self.scale_attention.init_weights(generator)

    def attention(self, context_features: Sequence[Tensor]) -> Tensor | float:
        """sigmoid(scale_attention(context features)) [B, K, h, w], or the fixed attention (a float)."""
        if self.fixed_attention is not None:
            return self.fixed_attention
        return torch.sigmoid(self.scale_attention(context_features)[1])

    def forward(self, context_features: Sequence[Tensor], detail_features: Sequence[Tensor]
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | float]:
        context_embedding, context_logits = self.head(context_features)
        _, detail_logits = self.head(detail_features)
        return context_embedding, context_logits, detail_logits, self.attention(context_features)
