"""Segmentor = MiT backbone + DAFormer head, its builders, and whole/sliding-window inference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dida.models.daformer_head import DAFormerHead
from dida.models.mit import MixVisionTransformer, build_mit

if TYPE_CHECKING:
    from dida.config import ModelCfg


@dataclass
class SegmentorOutput:
    """What a forward pass returns (all at the resolution the network produces).

    Attributes:
        features: the 4 backbone maps, [B, C_i, H/2^(i+2), W/2^(i+2)].
        embedding: DIDA's fused feature F, [B, D, H/4, W/4] (ReLU output, before dropout).
        logits: [B, num_classes, H/4, W/4].
    """

    features: list[torch.Tensor]
    embedding: torch.Tensor
    logits: torch.Tensor


class Segmentor(nn.Module):
    """Encoder-decoder without neck or auxiliary head (mmseg ``EncoderDecoder`` as configured by DAFormer)."""

    def __init__(self, backbone: MixVisionTransformer, decode_head: DAFormerHead) -> None:
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

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Re-draw every parameter with the reference initialisation from ``generator``."""
        self.backbone.init_weights(generator)
        self.decode_head.init_weights(generator)

    def extract_features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """img [B, 3, H, W] -> the 4 backbone maps."""
        return self.backbone(img)

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
        return _resize(out.embedding, size), _resize(out.logits, size)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False); identity (no copy) when the size already matches."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def build_segmentor(
    backbone: str = "mit_b5",
    num_classes: int = 19,
    *,
    embed_dims: Sequence[int] | None = None,
    num_heads: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    sr_ratios: Sequence[int] | None = None,
    drop_path_rate: float = 0.1,
    decoder_channels: int = 256,
    aspp_dilations: Sequence[int] = (1, 6, 12, 18),
    dropout_ratio: float = 0.1,
    generator: torch.Generator | None = None,
) -> Segmentor:
    """A named MiT variant (with optional overrides) + DAFormer head.

    With ``generator`` every parameter is drawn from it (reproducible without touching the global RNG);
    otherwise the default generator is used, as plain PyTorch modules do.
    """
    mit = build_mit(
        backbone,
        embed_dims=embed_dims,
        num_heads=num_heads,
        depths=depths,
        sr_ratios=sr_ratios,
        drop_path_rate=drop_path_rate,
        init=generator is None,
    )
    head = DAFormerHead(
        in_channels=mit.embed_dims,
        channels=decoder_channels,
        num_classes=num_classes,
        dilations=aspp_dilations,
        dropout_ratio=dropout_ratio,
        init=generator is None,
    )
    model = Segmentor(mit, head)
    if generator is not None:
        model.init_weights(generator)
    return model


def build_segmentor_from_cfg(cfg: ModelCfg, generator: torch.Generator | None = None) -> Segmentor:
    """Translate a ``dida.config.ModelCfg`` into ``build_segmentor`` keyword arguments."""
    return build_segmentor(
        cfg.backbone,
        cfg.num_classes,
        embed_dims=cfg.embed_dims,
        num_heads=cfg.num_heads,
        depths=cfg.depths,
        drop_path_rate=cfg.drop_path_rate,
        decoder_channels=cfg.decoder_channels,
        aspp_dilations=cfg.aspp_dilations,
        dropout_ratio=cfg.dropout_ratio,
        generator=generator,
    )


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or (height, width); got {v}")
    return v  # type: ignore[return-value]


def _logits_full(model: Segmentor, img: torch.Tensor) -> torch.Tensor:
    """Logits resized to the input size (the reference's ``encode_decode`` without the embedding)."""
    return _resize(model(img).logits, img.shape[-2:])


def slide_logits(
    model: Segmentor, img: torch.Tensor, crop_size: int | Sequence[int], stride: int | Sequence[int]
) -> torch.Tensor:
    """Sliding-window logits at the input size, averaged over overlapping windows (mmseg grid).

    img [B, 3, H, W] -> [B, C, H, W]. Windows start at multiples of the stride and are clamped to the
    image; each window's logits are resized to the window size and summed; the sum is divided by the
    per-pixel window count.
    """
    h_crop, w_crop = _pair(crop_size, "crop_size")
    h_stride, w_stride = _pair(stride, "stride")
    b, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((b, model.num_classes, h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * h_stride + h_crop, h_img)
            x2 = min(wi * w_stride + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            preds[:, :, y1:y2, x1:x2] += _logits_full(model, img[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def inference(
    model: Segmentor,
    img: torch.Tensor,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Class probabilities as the reference test loop computes them.

    Logits (whole image, or averaged sliding windows) are resized to the input size, then to
    ``out_size`` (the original image size; two-step resize as mmseg), then softmax over classes.
    Runs under ``torch.no_grad``; the caller decides train/eval mode (normally ``model.eval()``).
    Channels-last inputs are accepted as they are.

    Args:
        model: the segmentor.
        img: normalised images [B, 3, H, W].
        mode: ``"whole"`` or ``"slide"``.
        crop_size, stride: window size and step (int or (h, w)), required for ``"slide"``.
        out_size: (height, width) of the output; default the input size.

    Returns:
        probs [B, C, *out_size] (or [B, C, H, W]), in the dtype of the logits.
    """
    with torch.no_grad():
        if mode == "whole":
            logits = _logits_full(model, img)
        elif mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("slide inference needs crop_size and stride")
            logits = slide_logits(model, img, crop_size, stride)
        else:
            raise ValueError(f"unknown inference mode {mode!r}; use 'whole' or 'slide'")
        if out_size is not None:
            logits = _resize(logits, out_size)
        return logits.softmax(dim=1)
