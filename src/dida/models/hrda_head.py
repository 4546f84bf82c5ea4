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
import torch.nn.functional as F
from torch import Tensor, nn

from dida.models.daformer_head import DAFormerHead, LinearEmbed
from dida.models.layers import ConvModule, reset_linear_default

__all__ = ["HRDAHead", "ScaleAttentionHead"]


class ScaleAttentionHead(nn.Module):
    """Per-level Linear embeddings, upsampled to level 0, concatenated, 1x1 conv + BN + ReLU, classifier.

    ``forward(features)`` takes the backbone maps ([B, C_i, h_i, w_i], finest first) and returns
    ``(embedding [B, D, h_0, w_0], logits [B, num_outputs, h_0, w_0])``: the attention *logits* (the
    sigmoid is applied by ``HRDAHead.attention``). Same return convention as ``DAFormerHead``.

    Args:
        in_channels: channels of the backbone maps.
        channels: width D of the embeddings and of the fusion (``attention_embed_dim``, 256).
        num_outputs: attention channels (the class count when class-wise, else 1).
        dropout_ratio: Dropout2d before the classifier (the DAFormer head's, 0.1).
        init: draw the reference initialisation now (else call ``init_weights`` later).
    """

    def __init__(self, in_channels: Sequence[int], *, channels: int, num_outputs: int, dropout_ratio: float,
                 init: bool = True) -> None:
        super().__init__()
        self.in_channels = [int(c) for c in in_channels]
        self.channels = int(channels)
        self.num_outputs = int(num_outputs)
        self.embed_layers = nn.ModuleList(LinearEmbed(c, self.channels) for c in self.in_channels)
        self.fuse_layer = ConvModule(self.channels * len(self.in_channels), self.channels, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(self.channels, self.num_outputs, kernel_size=1)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """As the DAFormer head: Linear PyTorch default, ConvModule kaiming fan_out, conv_seg N(0, 0.01)."""
        for layer in self.embed_layers:
            reset_linear_default(layer.proj, generator)
        self.fuse_layer.init_weights(generator)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01, generator=generator)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(features) != len(self.embed_layers):
            raise ValueError(f"ScaleAttentionHead expects {len(self.embed_layers)} feature maps, "
                             f"got {len(features)}")
        size = features[0].shape[-2:]
        embedded = []
        for i, (layer, x) in enumerate(zip(self.embed_layers, features)):
            e = layer(x)
            if i > 0 and e.shape[-2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        embedding = self.fuse_layer(torch.cat(embedded, dim=1))
        return embedding, self.conv_seg(self.dropout(embedding))


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
