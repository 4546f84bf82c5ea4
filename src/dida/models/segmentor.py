"""The encoder-decoder segmentor (a backbone + the DAFormer head) and its builders."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dida.models.base import BaseSegmentor, SegmentorOutput
from dida.models.daformer_head import DAFormerHead
from dida.models.ops import resize

if TYPE_CHECKING:
    from dida.config import ModelCfg

__all__ = ["Segmentor", "SegmentorOutput", "build_encoder_decoder", "build_segmentor", "infer_daformer_head_fields"]


class Segmentor(BaseSegmentor):
    """Encoder-decoder without neck or auxiliary head (mmseg ``EncoderDecoder`` as configured by DAFormer).

    Args:
        backbone: any backbone whose ``forward`` returns the maps the head expects (``out_channels``).
        decode_head: the DAFormer head; its output stride is the stride of the backbone's first map.
    """

    def __init__(self, backbone: nn.Module, decode_head: DAFormerHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    @property
    def embed_dim(self) -> int:
        """Channels D of the embedding F (= the decoder channels)."""
        return self.decode_head.channels

    def forward(self, img: torch.Tensor) -> SegmentorOutput:
        """img [B, 3, H, W] (normalised) -> features, embedding and logits at low resolution."""
        features = self.backbone(img)
        embedding, logits = self.decode_head(features)
        return SegmentorOutput(features=features, embedding=embedding, logits=logits)

    def encode_decode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, 3, H, W] -> (embedding [B, D, H, W], logits [B, C, H, W]), bilinear, align_corners=False.

        Note the embedding at full resolution is large (256 x H x W floats per image); inference and the
        DIDA terms avoid it by working at 1/4 resolution where they can.
        """
        out = self(img)
        size = img.shape[-2:]
        return resize(out.embedding, size), resize(out.logits, size)


def build_segmentor(
    backbone: str = "mit_b5",
    num_classes: int = 19,
    *,
    embed_dims: Sequence[int] | None = None,
    num_heads: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    drop_path_rate: float = 0.1,
    decoder_channels: int = 256,
    aspp_dilations: Sequence[int] = (1, 6, 12, 18),
    dropout_ratio: float = 0.1,
    generator: torch.Generator | None = None,
) -> BaseSegmentor:
    """A registered backbone (with optional MiT overrides) + DAFormer head, from keyword arguments.

    With ``generator`` every parameter is drawn from it (reproducible without touching the global RNG);
    otherwise the default generator is used, as plain PyTorch modules do.
    """
    from dida.config import ModelCfg
    from dida.models.registry import build_model

    cfg = ModelCfg(backbone=backbone, num_classes=num_classes,
                   embed_dims=None if embed_dims is None else list(embed_dims),
                   num_heads=None if num_heads is None else list(num_heads),
                   depths=None if depths is None else list(depths), drop_path_rate=drop_path_rate,
                   decoder_channels=decoder_channels, aspp_dilations=list(aspp_dilations),
                   dropout_ratio=dropout_ratio)
    return build_model(cfg, generator)


def build_encoder_decoder(cfg: ModelCfg, generator: torch.Generator | None = None) -> Segmentor:
    """``model.segmentor=encoder_decoder``: the configured backbone + a DAFormer head on its maps."""
    from dida.models.registry import build_backbone

    backbone = build_backbone(cfg)
    channels = getattr(backbone, "out_channels", None)
    if channels is None:
        raise TypeError(f"backbone '{cfg.backbone}' does not declare out_channels (see dida.models.base)")
    head = DAFormerHead(in_channels=channels, channels=cfg.decoder_channels, num_classes=cfg.num_classes,
                        dilations=cfg.aspp_dilations, dropout_ratio=cfg.dropout_ratio, init=generator is None)
    model = Segmentor(backbone, head)
    if generator is not None:
        model.init_weights(generator)
    return model


def infer_daformer_head_fields(sd: Mapping[str, torch.Tensor], prefix: str = "decode_head.") -> dict[str, Any]:
    """``ModelCfg`` head fields (classes, decoder channels, ASPP dilations) from DAFormer-head weights.

    ASPP dilations are not stored in weights: the reference dilations when there are 4 branches,
    ``[1, 6, 12, ...]`` otherwise.
    """
    key = f"{prefix}conv_seg.weight"
    if key not in sd:
        return {}
    w = sd[key]
    fields: dict[str, Any] = {"num_classes": int(w.shape[0]), "decoder_channels": int(w.shape[1])}
    aspp = re.compile(rf"^{re.escape(prefix)}fuse_layer\.aspp_modules\.(\d+)\.")
    branches = {int(m.group(1)) for k in sd if (m := aspp.match(k))}
    if branches and len(branches) != 4:
        fields["aspp_dilations"] = [1] + [6 * j for j in range(1, len(branches))]
    return fields
