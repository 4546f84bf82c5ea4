"""Vision-foundation-model backbones: DINOv2 / DINOv3 ViTs through ``transformers``' backbone API, turned into
the four-level pyramid (strides 4, 8, 16, 32) that the DAFormer head, HRDA, the feature distance and DIDA's
embedding expect.

The transformer itself is ``transformers``' own ``Dinov2Backbone`` / ``DINOv3ViTBackbone`` (attribute ``vit``;
its parameter names are ``transformers``' own, so its published Hugging Face weights load by name once
``dida.models.foundation_weights`` has mapped the Hub layout onto the installed module's names). Around it:

1. **Padding** (crops of any size): the normalised image is zero-padded at the bottom and right (zero = the
   mean colour) to ``patch * ceil(16 * ceil(H / 16) / patch)`` pixels, the smallest multiple of the patch size
   whose token grid covers the stride-16 grid of the image; no pixel is dropped. DINOv2's learned position
   embeddings are interpolated to the token grid by ``transformers`` (bicubic, as the DINOv2 code); DINOv3's
   RoPE needs no interpolation.
2. **Multi-layer features**: the outputs of four blocks (``out_indices``, default evenly spaced, the last
   included), each through the model's final LayerNorm, prefix tokens (CLS, registers) dropped, as maps
   ``[B, C, h_p, w_p]`` at the patch stride.
3. **Stride 16**: a patch-14 map is resampled by exactly 14/16 (bilinear, pixel centres aligned:
   ``scale_factor`` with ``recompute_scale_factor=False``) and cropped to ``ceil(H/16) x ceil(W/16)``; a
   patch-16 map is already there.
4. **Simple feature pyramid** (ViTDet; one block per level as BEiT/MAE segmentation): block 1 -> 2x2
   transposed conv, LayerNorm, GELU, 2x2 transposed conv (stride 4); block 2 -> 2x2 transposed conv (stride
   8); block 3 -> identity (stride 16); block 4 -> 2x2 max-pool (stride 32, ``ceil_mode``). Levels are
   cropped to ``ceil(H/s)``: the same sizes as MiT's. Every level has the ViT's width C.

The last level is parameter-free (max-pooled normalised features of the chosen last block), so the feature
distance against a frozen model built with the same pretrained ViT compares foundation features directly.

``transformers`` is imported only when a backbone is built (optional extra ``dida[hf]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dida.models.layers import DropPath

if TYPE_CHECKING:
    from dida.config import ModelCfg

__all__ = [
    "VIT_VARIANTS", "FoundationViT", "SimpleFeaturePyramid", "ViTVariant", "build_foundation_vit",
    "default_out_indices", "padded_side", "require_transformers",
]

PYRAMID_STRIDES = (4, 8, 16, 32)
_BASE_STRIDE = 16  # the pyramid's identity level
_INIT_STD = 0.02  # transformers' initializer_range for both families


@dataclass(frozen=True)
class ViTVariant:
    """Architecture numbers of one published foundation ViT (the values of its Hub ``config.json``).

    ``mlp_ratio`` gives the MLP width (DINOv3's ``intermediate_size = 4 * hidden``); ``gated_mlp`` is
    DINOv2's SwiGLU (giant) or DINOv3's gated MLP ("plus" models); ``image_size`` is the pretraining grid
    of DINOv2's learned position embeddings (unused by DINOv3's RoPE).
    """

    family: Literal["dinov2", "dinov3"]
    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    gated_mlp: bool = False
    num_registers: int = 0
    mlp_ratio: int = 4
    hub: str = ""


def _v2(hidden: int, layers: int, heads: int, hub: str, gated: bool = False) -> ViTVariant:
    return ViTVariant("dinov2", hidden, layers, heads, 14, 518, gated_mlp=gated, hub=hub)


def _v3(hidden: int, layers: int, heads: int, hub: str, gated: bool = False) -> ViTVariant:
    return ViTVariant("dinov3", hidden, layers, heads, 16, 224, gated_mlp=gated, num_registers=4, hub=hub)


VIT_VARIANTS: dict[str, ViTVariant] = {
    "dinov2_vits14": _v2(384, 12, 6, "facebook/dinov2-small"),
    "dinov2_vitb14": _v2(768, 12, 12, "facebook/dinov2-base"),
    "dinov2_vitl14": _v2(1024, 24, 16, "facebook/dinov2-large"),
    "dinov2_vitg14": _v2(1536, 40, 24, "facebook/dinov2-giant", gated=True),
    "dinov3_vits16": _v3(384, 12, 6, "facebook/dinov3-vits16-pretrain-lvd1689m"),
    "dinov3_vits16plus": _v3(384, 12, 6, "facebook/dinov3-vits16plus-pretrain-lvd1689m", gated=True),
    "dinov3_vitb16": _v3(768, 12, 12, "facebook/dinov3-vitb16-pretrain-lvd1689m"),
    "dinov3_vitl16": _v3(1024, 24, 16, "facebook/dinov3-vitl16-pretrain-lvd1689m"),
    "dinov3_vith16plus": _v3(1280, 32, 20, "facebook/dinov3-vith16plus-pretrain-lvd1689m", gated=True),
}


def require_transformers(what: str) -> Any:
    """The ``transformers`` module, or a one-line ``ConfigError`` saying how to install it."""
    try:
        import transformers
    except ImportError:
        from dida.errors import ConfigError

        raise ConfigError(f"{what} needs Hugging Face transformers: pip install 'dida[hf]'") from None
    return transformers


def default_out_indices(num_layers: int) -> list[int]:
    """Four evenly spaced blocks (1-based) ending with the last: 12 -> [3, 6, 9, 12], 24 -> [6, 12, 18, 24]."""
    return [max(1, math.ceil(num_layers * k / 4)) for k in range(1, 5)]


def padded_side(side: int, patch: int) -> int:
    """Padded input side: the smallest multiple of ``patch`` covering the stride-16 grid of ``side`` pixels."""
    return patch * math.ceil(_BASE_STRIDE * math.ceil(side / _BASE_STRIDE) / patch)


def hf_config(variant: ViTVariant, out_indices: Sequence[int]) -> Any:
    """The ``transformers`` config of ``variant``, its backbone API returning the blocks ``out_indices``.

    Drop-path is 0 here (``FoundationViT`` installs its own per-block schedule) and DINOv3's RoPE
    coordinate augmentation (``pos_embed_rescale`` 2.0 on the Hub, applied in training mode) is off: it
    would make every student forward, and the EMA teacher that runs in training mode, see jittered positions.
    """
    tf = require_transformers(f"the {variant.family} backbone")
    stages = sorted(set(out_indices))
    common = {"hidden_size": variant.hidden_size, "num_hidden_layers": variant.num_layers,
              "num_attention_heads": variant.num_heads, "patch_size": variant.patch_size,
              "image_size": variant.image_size, "drop_path_rate": 0.0, "out_indices": stages,
              "apply_layernorm": True, "reshape_hidden_states": True}
    if variant.family == "dinov3" and not hasattr(tf, "DINOv3ViTConfig"):
        from dida.errors import ConfigError

        raise ConfigError(f"the dinov3 backbones need transformers >= 4.56 (installed: {tf.__version__}): "
                          "pip install -U 'dida[hf]'")
    if variant.family == "dinov2":
        cfg = tf.Dinov2Config(mlp_ratio=variant.mlp_ratio, use_swiglu_ffn=variant.gated_mlp, **common)
    else:
        cfg = tf.DINOv3ViTConfig(intermediate_size=variant.mlp_ratio * variant.hidden_size,
                                 use_gated_mlp=variant.gated_mlp, num_register_tokens=variant.num_registers,
                                 pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None, **common)
    cfg._attn_implementation = "sdpa"
    return cfg


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a map (ViTDet's ``LayerNorm2d``): [B, C, H, W] -> [B, C, H, W]."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on four stride-16 maps, one per level (as BEiT's ``fpn1..4``).

    Args:
        channels: C of every input and output map.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.up4_1 = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.up4_norm = ChannelLayerNorm(channels, eps=1e-6)
        self.up4_2 = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.up8 = nn.ConvTranspose2d(channels, channels, 2, stride=2)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Transposed convs: trunc_normal(std 0.02), bias 0 (transformers' ViT init); LayerNorm 1 / 0."""
        for m in (self.up4_1, self.up4_2, self.up8):
            nn.init.trunc_normal_(m.weight, std=_INIT_STD, generator=generator)
            nn.init.zeros_(m.bias)
        nn.init.ones_(self.up4_norm.weight)
        nn.init.zeros_(self.up4_norm.bias)

    def forward(self, maps: Sequence[Tensor], sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """maps: four [B, C, h16, w16]; sizes: the (h, w) of each level -> [B, C, h_s, w_s] per level."""
        x0 = self.up4_2(F.gelu(self.up4_norm(self.up4_1(maps[0]))))
        x1 = self.up8(maps[1])
        x3 = F.max_pool2d(maps[3], 2, ceil_mode=True)
        return [x[..., : s[0], : s[1]] for x, s in zip((x0, x1, maps[2], x3), sizes)]


class FoundationViT(nn.Module):
    """A ``transformers`` DINOv2 / DINOv3 ViT and a simple feature pyramid: 4 maps at strides 4, 8, 16, 32.

    Args:
        variant: the architecture (a ``VIT_VARIANTS`` entry, possibly with overrides).
        out_indices: the four blocks (1-based, non-decreasing) feeding the levels, finest first.
        frozen_blocks: the patch embeddings and this many first blocks get ``requires_grad=False``.
        drop_path_rate: stochastic depth of the last block, linear from 0 over the blocks (timm); 0 in
            frozen blocks.

    Layer ids for layer-wise lr decay (``layer_id``): patch embeddings 0, block i -> i, the rest (final
    norm, pyramid) ``num_layers + 1``.
    """

    def __init__(self, *, variant: ViTVariant, out_indices: Sequence[int], frozen_blocks: int,
                 drop_path_rate: float) -> None:
        super().__init__()
        tf = require_transformers(f"the {variant.family} backbone")
        self.variant = variant
        self.out_indices = tuple(int(i) for i in out_indices)
        if len(self.out_indices) != 4 or not 1 <= self.out_indices[0] <= self.out_indices[-1] <= variant.num_layers:
            raise ValueError(f"out_indices must be 4 blocks in [1, {variant.num_layers}], got {out_indices}")
        if not 0 <= frozen_blocks <= variant.num_layers:
            raise ValueError(f"frozen_blocks must be in [0, {variant.num_layers}], got {frozen_blocks}")
        config = hf_config(variant, self.out_indices)
        cls = tf.Dinov2Backbone if variant.family == "dinov2" else tf.DINOv3ViTBackbone
        self.vit = cls(config)
        self._stage = {idx: i for i, idx in enumerate(sorted(set(self.out_indices)))}
        self.pyramid = SimpleFeaturePyramid(channels=variant.hidden_size)
        self.pyramid.init_weights()
        self.patch_size = variant.patch_size
        self.num_layers = variant.num_layers
        self.out_channels = (variant.hidden_size,) * 4
        self.strides = PYRAMID_STRIDES
        self.frozen_blocks = int(frozen_blocks)
        blocks = self.blocks
        rates = torch.linspace(0, drop_path_rate, variant.num_layers, device="cpu").tolist()  # timm's schedule
        rates[: self.frozen_blocks] = [0.0] * self.frozen_blocks
        for block, rate in zip(blocks, rates):
            # dida's DropPath: per-block rates, and the EMA teacher recognises it (drop-path off).
            block.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
        mask_token = getattr(self.vit.embeddings, "mask_token", None)
        if isinstance(mask_token, nn.Parameter):
            # masked-image-modelling token: no segmentation forward reads it. Frozen, so that every trainable
            # parameter gets a gradient (DistributedDataParallel requires it).
            mask_token.requires_grad_(False)
        if self.frozen_blocks:
            self.vit.embeddings.requires_grad_(False)
            for block in blocks[: self.frozen_blocks]:
                block.requires_grad_(False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (``transformers``' ``encoder.layer`` / ``model.layer``)."""
        return self.vit.encoder.layer if self.variant.family == "dinov2" else self.vit.model.layer

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` (relative to this module) for layer-wise lr decay."""
        if name.startswith("vit.embeddings."):
            return 0
        prefix = "vit.encoder.layer." if self.variant.family == "dinov2" else "vit.model.layer."
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".", 1)[0]) + 1
        return self.num_layers + 1

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """``transformers``' init from ``generator``: Linear/Conv trunc_normal(0.02), bias 0, LayerNorm 1 / 0,
        CLS / register tokens / position embeddings trunc_normal(0.02), mask token 0, layer scales 1."""
        for m in self.vit.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=_INIT_STD, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, p in self.vit.embeddings.named_parameters(recurse=False):
            if name == "mask_token":
                nn.init.zeros_(p)
            else:  # cls_token, position_embeddings, register_tokens
                nn.init.trunc_normal_(p, std=_INIT_STD, generator=generator)
        for name, p in self.vit.named_parameters():
            if name.endswith(".lambda1"):
                nn.init.constant_(p, self.vit.config.layerscale_value)
        self.pyramid.init_weights(generator)

    def pad(self, img: Tensor) -> Tensor:
        """img [B, 3, H, W] zero-padded at the bottom/right to ``padded_side`` (no copy if already so)."""
        h, w = img.shape[-2:]
        ph, pw = padded_side(h, self.patch_size) - h, padded_side(w, self.patch_size) - w
        return F.pad(img, (0, pw, 0, ph)) if ph or pw else img

    def hidden_maps(self, pixel_values: Tensor) -> list[Tensor]:
        """The ``out_indices`` blocks' outputs for ``pixel_values`` as it is (no padding).

        Returns:
            four [B, C, H // p, W // p]: final LayerNorm applied, CLS and register tokens dropped (the
            ``feature_maps`` of ``transformers``' backbone API).
        """
        maps = self.vit(pixel_values=pixel_values).feature_maps
        return [maps[self._stage[i]] for i in self.out_indices]

    def forward(self, img: Tensor) -> list[Tensor]:
        """img [B, 3, H, W] (normalised) -> four maps [B, C, ceil(H/s), ceil(W/s)], s = 4, 8, 16, 32."""
        h, w = img.shape[-2:]
        g16 = (math.ceil(h / _BASE_STRIDE), math.ceil(w / _BASE_STRIDE))
        maps = self.to_stride16(self.hidden_maps(self.pad(img)), g16)
        sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in PYRAMID_STRIDES]
        return self.pyramid(maps, sizes)

    def to_stride16(self, maps: Sequence[Tensor], grid: tuple[int, int]) -> list[Tensor]:
        """Maps at the patch stride (of the padded image) -> [B, C, grid[0], grid[1]] at stride 16.

        Resampled by exactly p/16 (bilinear): output cell j's centre (j + 0.5) * 16 px reads the map at token
        coordinate (j + 0.5) * 16 / p - 0.5, i.e. the same pixel. A no-op crop for p = 16.
        """
        if self.patch_size != _BASE_STRIDE:
            maps = [F.interpolate(m, scale_factor=self.patch_size / _BASE_STRIDE, mode="bilinear",
                                  align_corners=False, recompute_scale_factor=False) for m in maps]
        return [m[..., : grid[0], : grid[1]] for m in maps]


def resolve_variant(cfg: ModelCfg) -> ViTVariant:
    """``VIT_VARIANTS[cfg.backbone]`` with the ``model.vit`` architecture overrides applied."""
    v, o = VIT_VARIANTS[cfg.backbone], cfg.vit
    fields = {"hidden_size": o.hidden_size, "num_layers": o.num_layers, "num_heads": o.num_heads,
              "patch_size": o.patch_size, "image_size": o.image_size}
    return replace(v, **{k: val for k, val in fields.items() if val is not None})


def build_foundation_vit(cfg: ModelCfg) -> FoundationViT:
    """The backbone of ``model.backbone`` (a ``VIT_VARIANTS`` name) with ``model.vit`` and ``drop_path_rate``."""
    from dida.errors import ConfigError

    variant = resolve_variant(cfg)
    layers = variant.num_layers
    out_indices = cfg.vit.out_indices or default_out_indices(layers)
    if variant.hidden_size % variant.num_heads:
        raise ConfigError(f"model.vit: hidden_size {variant.hidden_size} is not a multiple of num_heads "
                          f"{variant.num_heads}")
    if max(out_indices) > layers:
        raise ConfigError(f"model.vit.out_indices: {list(out_indices)} names a block beyond the {layers} of "
                          f"{cfg.backbone}")
    if cfg.vit.frozen_blocks > layers:
        raise ConfigError(f"model.vit.frozen_blocks: {cfg.vit.frozen_blocks} exceeds the {layers} blocks of "
                          f"{cfg.backbone}")
    return FoundationViT(variant=variant, out_indices=out_indices, frozen_blocks=cfg.vit.frozen_blocks,
                         drop_path_rate=cfg.drop_path_rate)
