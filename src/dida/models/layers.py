"""Small building blocks shared by the backbone and the decode head.

``DropPath`` follows timm 0.3.2 (per-sample stochastic depth). ``ConvModule`` and
``DepthwiseSeparableConvModule`` reproduce mmcv 1.4's conv -> BN -> ReLU modules with their parameter
names (``conv``, ``bn``; ``depthwise_conv``, ``pointwise_conv``) so that mmcv checkpoints load by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth: zero whole samples with probability ``p`` and rescale by ``1/(1-p)``.

    Args:
        x: any tensor whose first dimension is the batch, e.g. tokens [B, N, C].
        p: drop probability.
        training: identity when False.

    Returns:
        Tensor of the same shape as ``x``.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    # timm 0.3.2: floor(keep + U[0,1)) is 1 with probability keep. Like nn.Dropout, the draw uses the
    # device's default generator (seeded by the engine), so that it works unchanged under DDP and AMP.
    mask = torch.floor(keep + torch.rand(shape, dtype=x.dtype, device=x.device))
    return x.div(keep) * mask


class DropPath(nn.Module):
    """Stochastic depth as a module (``p`` is the per-sample drop probability)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"


class ConvModule(nn.Module):
    """mmcv ``ConvModule``: Conv2d (no bias) -> BatchNorm2d -> ReLU, kaiming-initialised at construction.

    Input [B, in_channels, H, W] -> output [B, out_channels, H', W'].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """mmcv: kaiming normal (fan_out, relu gain) for the conv; BN weight 1, bias 0."""
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv ``DepthwiseSeparableConvModule``: depthwise ConvModule then 1x1 pointwise ConvModule.

    Input [B, in_channels, H, W] -> output [B, out_channels, H, W] (with ``padding == dilation`` for 3x3).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0, dilation: int = 1
    ) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(
            in_channels, in_channels, kernel_size, padding=padding, dilation=dilation, groups=in_channels
        )
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        self.depthwise_conv.init_weights(generator)
        self.pointwise_conv.init_weights(generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


def reset_linear_default(layer: nn.Linear, generator: torch.Generator | None = None) -> None:
    """PyTorch's default ``nn.Linear`` init (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))).

    Same distribution as ``nn.Linear.reset_parameters``, but drawn from ``generator``.
    """
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        fan_in = layer.weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
