"""DAFormer decode head with the separable-ASPP ("sepaspp") fusion (spec 1.3).

Module paths match the mmcv checkpoint keys: ``embed_layers.{i}.proj``,
``fuse_layer.aspp_modules.{j}...``, ``fuse_layer.bottleneck.{conv,bn}``, ``conv_seg``.
DIDA's change is kept: ``forward`` returns the fused feature map F (the "embedding") with the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dida.models.layers import ConvModule, DepthwiseSeparableConvModule, reset_linear_default


class LinearEmbed(nn.Module):
    """Per-level token embedding: Linear(C_in, D) over channels, no norm, no activation.

    [B, C_in, h, w] -> [B, D, h, w].
    """

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(2, (h, w))


class ASPPWrapper(nn.Module):
    """ASPP without image pooling: one branch per dilation, concatenated, then a 3x3 bottleneck.

    A dilation of 1 gives a 1x1 ConvModule; any other dilation d a depthwise-separable 3x3 branch with
    padding d (mmseg's ``DepthwiseSeparableASPPModule``). [B, C_in, h, w] -> [B, D, h, w].
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, channels, 1)
            if d == 1
            else DepthwiseSeparableConvModule(in_channels, channels, 3, padding=d, dilation=d)
            for d in self.dilations
        )
        self.bottleneck = ConvModule(len(self.dilations) * channels, channels, 3, padding=1)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        for m in self.aspp_modules:
            m.init_weights(generator)
        self.bottleneck.init_weights(generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
    """Embed each level, upsample to level 0, concatenate, fuse with ASPP, classify.

    ``forward(features)`` takes the 4 backbone maps ([B, C_i, H/2^(i+2), W/2^(i+2)]) and returns
    ``(embedding [B, D, H/4, W/4], logits [B, num_classes, H/4, W/4])``; the embedding is the ReLU output
    of the ASPP bottleneck, taken before Dropout2d and ``conv_seg`` (not normalised, non-negative).
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (64, 128, 320, 512),
        channels: int = 256,
        num_classes: int = 19,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout_ratio: float = 0.1,
        init: bool = True,
        fusion: Literal["sep_aspp", "conv"] = "sep_aspp",
    ) -> None:
        super().__init__()
        self.in_channels = [int(c) for c in in_channels]
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.embed_layers = nn.ModuleList(LinearEmbed(c, self.channels) for c in self.in_channels)
        fused_in = self.channels * len(self.in_channels)
        if fusion == "sep_aspp":
            self.fuse_layer: nn.Module = ASPPWrapper(fused_in, self.channels, dilations)
        elif fusion == "conv":  # HRDA's scale-attention head: a 1x1 ConvModule
            self.fuse_layer = ConvModule(fused_in, self.channels, 1)
        else:
            raise ValueError(f"DAFormerHead: fusion must be 'sep_aspp' or 'conv', got {fusion!r}")
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(self.channels, self.num_classes, kernel_size=1)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Reference init: embed Linear PyTorch default, ConvModules kaiming fan_out, conv_seg N(0, 0.01)."""
        for layer in self.embed_layers:
            reset_linear_default(layer.proj, generator)
        self.fuse_layer.init_weights(generator)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01, generator=generator)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(features) != len(self.embed_layers):
            n = len(self.embed_layers)
            raise ValueError(f"{type(self).__name__} expects {n} feature maps, got {len(features)}")
        size = features[0].shape[-2:]
        embedded = []
        for i, (layer, x) in enumerate(zip(self.embed_layers, features)):
            e = layer(x)
            if i > 0 and e.shape[-2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        embedding = self.fuse_layer(torch.cat(embedded, dim=1))
        logits = self.conv_seg(self.dropout(embedding))
        return embedding, logits
