"""Mix Transformer (MiT) encoder of SegFormer, as used unchanged by DAFormer and DIDA (spec 1.2).

Parameter names equal the official SegFormer ImageNet files (``patch_embed1.proj.weight``,
``block3.12.attn.kv.weight``, ``norm4.bias``, ...), so those files load strictly once their
ImageNet classifier (``head.*``) is dropped. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (default scale head_dim^-0.5), which equals the
reference's explicit ``softmax(q k^T * scale) v``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dida.models.layers import DropPath

# LayerNorm eps: the blocks and the stage outputs use the 1e-6 ``norm_layer``; the patch embedding and
# the spatial-reduction norm use PyTorch's default 1e-5 (a reference detail that matters for parity).
BLOCK_LN_EPS = 1e-6
DEFAULT_LN_EPS = 1e-5


@dataclass(frozen=True)
class MiTVariant:
    """Architecture numbers of one MiT size."""

    embed_dims: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
MIT_VARIANTS: dict[str, MiTVariant] = {
    "mit_b0": MiTVariant((32, 64, 160, 256), _HEADS, (2, 2, 2, 2)),
    "mit_b1": MiTVariant(_WIDE, _HEADS, (2, 2, 2, 2)),
    "mit_b2": MiTVariant(_WIDE, _HEADS, (3, 4, 6, 3)),
    "mit_b3": MiTVariant(_WIDE, _HEADS, (3, 4, 18, 3)),
    "mit_b4": MiTVariant(_WIDE, _HEADS, (3, 8, 27, 3)),
    "mit_b5": MiTVariant(_WIDE, _HEADS, (3, 6, 40, 3)),
}


def _tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] -> [B, C, h, w] (a view; no copy)."""
    return x.transpose(1, 2).unflatten(2, (h, w))


def conv_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with the weight in channels-last strides, for maps that are token views.

    A token tensor [B, N, C] viewed as [B, C, h, w] has channels-last strides. With a channels-last
    weight too, oneDNN and cuDNN convolve in NHWC directly: the map is not copied to NCHW and the
    output's ``flatten(2).transpose(1, 2)`` is already contiguous tokens (no copy in the next Linear).
    Same values as ``conv(x)`` up to float rounding. A depthwise weight [C, 1, k, k] gets the strides
    by a view (``.contiguous(memory_format=...)`` would keep its NCHW strides: size-1 dim); others are
    copied once per call (small; free once the model itself is channels-last).
    """
    w = conv.weight
    o, i, kh, kw = w.shape
    if i == 1:
        w = w.reshape(o, kh, kw, 1).permute(0, 3, 1, 2)
    else:
        w = w.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlap, then LayerNorm(eps 1e-5) over tokens.

    Input [B, C_in, H, W] -> tokens [B, H'*W', C_out] plus (H', W').
    """

    def __init__(self, in_channels: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=DEFAULT_LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = conv_channels_last(self.proj, x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a spatially reduced (sr x sr conv) map.

    Tokens [B, N=h*w, C] -> [B, N, C]. Heads split C into contiguous groups of ``C // num_heads``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=DEFAULT_LN_EPS)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        head_dim = c // self.num_heads
        q = self.q(x).unflatten(2, (self.num_heads, head_dim)).transpose(1, 2)  # [B, heads, N, d]
        if self.sr_ratio > 1:
            reduced = conv_channels_last(self.sr, _tokens_to_map(x, h, w))
            reduced = reduced.flatten(2).transpose(1, 2)  # [B, M, C]
            kv_in = self.norm(reduced)
        else:
            kv_in = x
        # kv output channels: [k (C) | v (C)], each split into heads: [2, B, heads, M, d].
        kv = self.kv(kv_in).unflatten(2, (2, self.num_heads, head_dim)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # scale = head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv on the token map -> exact GELU -> fc2. Tokens [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DepthwiseConv(nn.Module):
    """3x3 depthwise conv applied to tokens viewed as a map (module path ``mlp.dwconv.dwconv``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return conv_channels_last(self.dwconv, _tokens_to_map(x, h, w)).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN1 x)); x + DropPath(MixFFN(LN2 x))."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """The four-stage MiT encoder. ``forward(img [B,3,H,W])`` returns the stage maps at strides 4, 8, 16, 32.

    Outputs: [B, C1, H/4, W/4], [B, C2, H/8, W/8], [B, C3, H/16, W/16], [B, C4, H/32, W/32] (sizes rounded
    up, as the strided convolutions give).
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = _WIDE,
        num_heads: Sequence[int] = _HEADS,
        depths: Sequence[int] = (3, 6, 40, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: int = 4,
        drop_path_rate: float = 0.1,
        in_channels: int = 3,
        init: bool = True,
    ) -> None:
        super().__init__()
        for name, seq in (("embed_dims", embed_dims), ("num_heads", num_heads), ("depths", depths),
                          ("sr_ratios", sr_ratios)):
            if len(seq) != 4:
                raise ValueError(f"MixVisionTransformer needs 4 stages; got {name}={list(seq)}")
        self.embed_dims = [int(d) for d in embed_dims]
        # The backbone protocol (dida.models.base): channels and strides of the returned maps.
        self.out_channels = tuple(self.embed_dims)
        self.strides = (4, 8, 16, 32)
        self.num_heads = [int(h) for h in num_heads]
        self.depths = [int(d) for d in depths]
        self.sr_ratios = [int(r) for r in sr_ratios]
        self.drop_path_rate = float(drop_path_rate)
        # Linear over ALL blocks, as the reference: torch.linspace(0, rate, sum(depths)) in float32.
        # (Computed on the CPU so that building under ``torch.device("meta")`` works too.)
        rates = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()
        cur = 0
        prev = in_channels
        for s in range(4):
            k, stride = (7, 4) if s == 0 else (3, 2)
            dim = self.embed_dims[s]
            setattr(self, f"patch_embed{s + 1}", OverlapPatchEmbed(prev, dim, k, stride))
            blocks = nn.ModuleList(
                Block(dim, self.num_heads[s], self.sr_ratios[s], mlp_ratio, rates[cur + i])
                for i in range(self.depths[s])
            )
            setattr(self, f"block{s + 1}", blocks)
            setattr(self, f"norm{s + 1}", nn.LayerNorm(dim, eps=BLOCK_LN_EPS))
            cur += self.depths[s]
            prev = dim
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Reference init without a pretrained file.

        Linear: trunc_normal(std 0.02), bias 0. LayerNorm: 1 / 0. Conv2d: N(0, sqrt(2 / fan_out)) with
        fan_out = k_h * k_w * out_channels / groups, bias 0.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out), generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{s}")(x)
            for blk in getattr(self, f"block{s}"):
                tokens = blk(tokens, h, w)
            tokens = getattr(self, f"norm{s}")(tokens)
            x = tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2).contiguous()  # [B, C, h, w]
            outs.append(x)
        return outs


def build_mit(
    variant: str = "mit_b5",
    *,
    embed_dims: Sequence[int] | None = None,
    num_heads: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    sr_ratios: Sequence[int] | None = None,
    drop_path_rate: float = 0.1,
    init: bool = True,
) -> MixVisionTransformer:
    """A named MiT variant with optional overrides of its numbers."""
    if variant not in MIT_VARIANTS:
        raise ValueError(f"unknown backbone {variant!r}; choose one of {', '.join(MIT_VARIANTS)}")
    v = MIT_VARIANTS[variant]
    return MixVisionTransformer(
        embed_dims=embed_dims if embed_dims is not None else v.embed_dims,
        num_heads=num_heads if num_heads is not None else v.num_heads,
        depths=depths if depths is not None else v.depths,
        sr_ratios=sr_ratios if sr_ratios is not None else v.sr_ratios,
        mlp_ratio=v.mlp_ratio,
        drop_path_rate=drop_path_rate,
        init=init,
    )


def mit_b0(**kwargs) -> MixVisionTransformer:
    """MiT-B0 (3.32 M parameters)."""
    return build_mit("mit_b0", **kwargs)


def mit_b1(**kwargs) -> MixVisionTransformer:
    """MiT-B1 (13.15 M parameters)."""
    return build_mit("mit_b1", **kwargs)


def mit_b2(**kwargs) -> MixVisionTransformer:
    """MiT-B2 (24.20 M parameters)."""
    return build_mit("mit_b2", **kwargs)


def mit_b3(**kwargs) -> MixVisionTransformer:
    """MiT-B3 (44.07 M parameters)."""
    return build_mit("mit_b3", **kwargs)


def mit_b4(**kwargs) -> MixVisionTransformer:
    """MiT-B4 (60.84 M parameters)."""
    return build_mit("mit_b4", **kwargs)


def mit_b5(**kwargs) -> MixVisionTransformer:
    """MiT-B5 (81,443,008 parameters), the backbone of DAFormer and DIDA."""
    return build_mit("mit_b5", **kwargs)
