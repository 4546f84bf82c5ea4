"""HRDA: a context view of the whole crop at low resolution fused with a high-resolution detail crop
(spec hrda_mic.md 1).

Notation (spec 1.1): input crop x [B, 3, H, W]; context scale s_L (0.5), detail scale s_H = 1; detail crop
c (512); crop-offset divisor d (8); output stride o of the head (4, the stride of the backbone's first map).

Training forward (spec 1.3-1.4), for a detail box b = (y1, x1) of size c:

    f^L = E(resize(x, s_L))                 f^H = E(crop_b(x))           (one shared backbone E)
    z^L = D(f^L) [B, C, H/8, W/8]           z^H = D(f^H) [B, C, c/4, c/4]   (one shared DAFormer head D)
    a   = m^L * sigmoid(A(f^L))             m^L = 1 on the context cells of b (box / (o / s_L), truncated)
    z^F = U(a) * Pad_b(z^H) + U((1 - a) * z^L)                       [B, C, H/4, W/4]

with U the bilinear x(s_H / s_L) upsampling (align_corners False) and Pad_b a zero canvas holding z^H at
b / o. The mask is applied before upsampling, so the ring of fused cells just outside the window keeps a
little attention weight on a zero detail logit (quirk Q8, reproduced). Test time (spec 1.6) uses the whole
input as context, the detail branch by sliding c-windows (stride c/2) averaged by coverage, and no mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dida.models.base import BaseSegmentor, SegmentorOutput
from dida.models.daformer_head import DAFormerHead
from dida.models.hrda_head import HRDAHead, ScaleAttentionHead
from dida.models.inference import slide_boxes
from dida.models.losses import seg_ce
from dida.models.ops import resize

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dida.config import ModelCfg

__all__ = [
    "DetailBox", "HRDABranch", "HRDABranches", "HRDAOutput", "HRDASegmentor", "assemble_windows",
    "build_hrda", "fuse_scales", "infer_hrda_fields", "sample_detail_box",
]


# ----------------------------------------------------------------------------------- geometry


class DetailBox(NamedTuple):
    """A detail crop in input pixels: top-left corner (y1, x1) and size (height, width)."""

    y1: int
    x1: int
    height: int
    width: int

    @property
    def y2(self) -> int:
        return self.y1 + self.height

    @property
    def x2(self) -> int:
        return self.x1 + self.width

    def crop(self, x: Tensor) -> Tensor:
        """The box of ``x [..., H, W]`` (a view)."""
        return x[..., self.y1:self.y2, self.x1:self.x2]


def sample_detail_box(height: int, width: int, *, crop_size: Sequence[int], divisor: int,
                      allow_last_offset: bool, generator: torch.Generator | None = None) -> DetailBox:
    """Draw a detail crop for an input of ``height x width`` (spec 1.3.2).

    Offsets are ``d * u`` with ``u`` drawn uniformly, first for y then for x, from
    ``{0, ..., floor((size - c + 1) / d) - 1}``: the reference's bound, which never reaches the offset
    flush with the border (quirk Q1), or from ``{0, ..., floor((size - c) / d)}`` with
    ``allow_last_offset``. An empty range gives offset 0: the image is the crop size (the reference then
    uses the whole image) or less than ``d - 1`` pixels larger (where the reference's draw would fail).
    Exactly two numbers are drawn, from ``generator`` (a CPU generator) or, when None, from torch's
    global CPU RNG (seeded per iteration by the training loop; under DDP each rank draws from its own).
    """
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])

    def choices(size: int, crop: int) -> int:
        margin = size - crop
        if margin < 0:
            raise ValueError(f"HRDA: the detail crop {crop_h}x{crop_w} is larger than the input "
                             f"{height}x{width}")
        n = margin // divisor + 1 if allow_last_offset else (margin + 1) // divisor
        return max(n, 1)

    n_y, n_x = choices(height, crop_h), choices(width, crop_w)
    u_y = int(torch.randint(n_y, (), generator=generator))
    u_x = int(torch.randint(n_x, (), generator=generator))
    return DetailBox(u_y * divisor, u_x * divisor, crop_h, crop_w)


def rescale(x: Tensor, factor: float) -> Tensor:
    """Bilinear resize of ``[B, C, h, w]`` by ``factor`` (align_corners=False; mmseg ``resize`` with a
    scale factor, output ``floor(h * factor)``); ``x`` itself for a factor of 1."""
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def fuse_scales(context_logits: Tensor, attention: Tensor | float, detail_logits: Tensor, *,
                box: DetailBox | None, output_stride: int, context_scale: float
                ) -> tuple[Tensor, Tensor, Tensor | float]:
    """The HRDA fusion (spec 1.4.4-8).

    Args:
        context_logits: z^L [B, C, h, w] (the context covers the whole input at stride o / s_L).
        attention: sigmoid attention [B, K, h, w] (K = C or 1), or a fixed float.
        detail_logits: z^H, [B, C, c_h / o, c_w / o] with a box, else [B, C, h / s_L, w / s_L].
        box: the detail crop in input pixels, or None (test time: the detail covers the whole input).
        output_stride: o, the head's stride on its input.
        context_scale: s_L (the detail scale is 1).

    Returns:
        ``(fused [B, C, h / s_L, w / s_L], scaled context logits (1 - a) * z^L [B, C, h, w],
        attention a masked to the detail window at the context grid)``.
    """
    if box is not None:
        grid = output_stride / context_scale  # input pixels per context cell; the reference truncates
        mask = context_logits.new_zeros((context_logits.shape[0], 1, *context_logits.shape[2:]))
        mask[:, :, int(box.y1 / grid):int(box.y2 / grid), int(box.x1 / grid):int(box.x2 / grid)] = 1
        attention = attention * mask
    scaled_context = (1 - attention) * context_logits
    up_context = rescale(scaled_context, 1 / context_scale)
    up_attention = rescale(attention, 1 / context_scale) if isinstance(attention, Tensor) else attention
    if box is None:
        detail = detail_logits
    else:
        detail = torch.zeros_like(up_context)
        o = output_stride
        window = detail[:, :, box.y1 // o:box.y2 // o, box.x1 // o:box.x2 // o]
        if window.shape != detail_logits.shape:
            raise ValueError(f"HRDA: detail logits {tuple(detail_logits.shape)} do not fit the box {box} "
                             f"on the fused grid {tuple(detail.shape)}")
        window.copy_(detail_logits)
    if detail.shape != up_context.shape:
        raise ValueError(f"HRDA: detail logits {tuple(detail.shape)} and upsampled context logits "
                         f"{tuple(up_context.shape)} differ in shape")
    return up_attention * detail + up_context, scaled_context, attention


def assemble_windows(window_logits: Tensor, boxes: Sequence[tuple[int, int, int, int]], batch: int,
                     output_stride: int, size: Sequence[int]) -> Tensor:
    """Average window logits over their coverage (spec 1.6.3, logit averaging).

    Args:
        window_logits: [K * N, C, h_c, w_c], window-major (window k is rows ``k*N ... k*N+N-1``).
        boxes: the K windows ``(y1, y2, x1, x2)`` in input pixels (multiples of ``output_stride``).
        batch: N.
        output_stride: o.
        size: the input (height, width).

    Returns:
        [N, C, H / o, W / o]: the sum of the windows covering each cell divided by their count.
    """
    o = output_stride
    c = window_logits.shape[1]
    total = window_logits.new_zeros((batch, c, int(size[0]) // o, int(size[1]) // o))
    count = window_logits.new_zeros((1, 1, *total.shape[2:]))
    for k, (y1, y2, x1, x2) in enumerate(boxes):
        total[:, :, y1 // o:y2 // o, x1 // o:x2 // o] += window_logits[k * batch:(k + 1) * batch]
        count[:, :, y1 // o:y2 // o, x1 // o:x2 // o] += 1
    return total / count


# -------------------------------------------------------------------------------------- outputs


@dataclass
class HRDAOutput(SegmentorOutput):
    """HRDA's forward output. ``logits`` are the fused z^F [B, C, H/4, W/4].

    ``features`` are the context-branch backbone maps (what the ImageNet feature distance compares, spec
    3.7) and ``embedding`` the DAFormer head's D-channel embedding on the context branch, [B, D, H/8, W/8]
    (see ``HRDASegmentor``).

    Attributes:
        detail_logits: z^H, [B, C, c_h/4, c_w/4] for the detail crop (training), or the window average
            [B, C, H/4, W/4] (``predict``).
        context_logits: the attention-scaled context logits (1 - a) * z^L [B, C, H/8, W/8] (quirk Q7: this
            is what the reference returns and supervises as its "LR" output).
        attention: a [B, K, H/8, W/8] (K = C class-wise, else 1) after masking to the detail window
            (training), unmasked at test time.
        detail_box: the detail crop in input pixels (None at test time or without a crop).
    """

    detail_logits: Tensor
    context_logits: Tensor
    attention: Tensor
    detail_box: DetailBox | None


@dataclass
class HRDABranches:
    """The reference's ``--hrda-out`` views of a test-time forward, each [N, *, H/4, W/4].

    Attributes:
        context: context-only logits U(z^L) [N, C, ...] (the reference's fixed attention 0, ``LR``).
        detail: detail-only logits (the window average) [N, C, ...] (fixed attention 1, ``HR``).
        attention: ``sum_k U(a)_k * softmax(z^F)_k`` [N, 1, ...] (``ATT``; the reference writes it x255).
    """

    context: Tensor
    detail: Tensor
    attention: Tensor


# ------------------------------------------------------------------------------------ segmentor


class HRDASegmentor(BaseSegmentor):
    """HRDA's multi-resolution encoder-decoder: one backbone and one ``HRDAHead`` for both scales.

    ``forward`` is the training forward (a random detail crop per call), ``predict`` the test-time
    forward (EMA teacher, evaluation), ``extract_features`` the backbone on the context input.

    The ``embedding`` of both is the DAFormer head's fusion output on the **context** branch. DIDA's
    instance term pairs the teacher's embedding of the target with the student's embedding of the mixed
    image pixel for pixel over the whole crop; only the context branch covers the whole crop in both
    (the student's detail branch sees a random box, the teacher's the averaged windows, spec 10.4), and it
    sees images at 0.5 of full resolution, the pixel scale of DAFormer/DIDA's inputs and of their banks
    (spec 10.5).

    Args:
        backbone: any registered backbone (``out_channels``, ``strides``).
        decode_head: the head pair.
        scales: (context, detail) input scales; sorted ascending (quirk Q3); the detail scale must be 1.
        detail_crop_size: c as (height, width), or None for no crop (the detail branch sees the input).
        crop_divisor: d; a multiple of the output stride.
        allow_last_offset: let the sampler reach the offset flush with the border (quirk Q1 off).
        hr_loss_weight, lr_loss_weight: lambda_d and lambda_l of the loss (spec 1.5).
        slide_inference: test-time detail branch by sliding windows (else one pass over the input).
        slide_overlap: slide stride c/2 (else c).
        blur_detail: the detail input is the image resized by 0.5 then 2 (ablation).
        checkpoint_backbone: recompute the backbone's activations in backward (``torch.utils.checkpoint``)
            when gradients are enabled; same numbers (the RNG state is restored for drop-path), less memory.
            A backbone with BatchNorm would update its running statistics twice.
    """

    def __init__(self, backbone: nn.Module, decode_head: HRDAHead, *, scales: Sequence[float],
                 detail_crop_size: Sequence[int] | None, crop_divisor: int, allow_last_offset: bool,
                 hr_loss_weight: float, lr_loss_weight: float, slide_inference: bool, slide_overlap: bool,
                 blur_detail: bool, checkpoint_backbone: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        strides = getattr(backbone, "strides", None)
        if strides is None:
            raise TypeError("HRDA needs a backbone that declares strides (see dida.models.base)")
        self.output_stride = int(strides[0])
        ordered = sorted(float(s) for s in scales)
        if len(ordered) != 2 or ordered[1] != 1.0 or not 0 < ordered[0] <= 1:
            raise ValueError(f"HRDA: scales must be (s_L, 1) with 0 < s_L <= 1; got {list(scales)}")
        context_scale = ordered[0]
        grid = self.output_stride / context_scale
        if grid != int(grid):
            raise ValueError(f"HRDA: output stride / context scale must be an integer; got {grid}")
        self.context_scale = context_scale
        self.alignment = int(grid)  # input sizes are multiples of this (one context cell)
        o = self.output_stride
        if crop_divisor < 1 or crop_divisor % o:
            raise ValueError(f"HRDA: crop_divisor must be a positive multiple of the output stride {o}; "
                             f"got {crop_divisor}")
        self.detail_crop_size: tuple[int, int] | None = None
        if detail_crop_size is not None:
            crop = tuple(int(c) for c in detail_crop_size)
            step = 2 * o if slide_inference and slide_overlap else o
            if len(crop) != 2 or min(crop) <= 0 or crop[0] % step or crop[1] % step:
                raise ValueError(f"HRDA: detail_crop_size must be two positive multiples of {step} "
                                 f"(output stride {o}{', halved by the slide stride' if step > o else ''}); "
                                 f"got {list(detail_crop_size)}")
            self.detail_crop_size = (crop[0], crop[1])
        self.crop_divisor = int(crop_divisor)
        self.allow_last_offset = bool(allow_last_offset)
        self.hr_loss_weight = float(hr_loss_weight)
        self.lr_loss_weight = float(lr_loss_weight)
        self.slide_inference = bool(slide_inference)
        self.slide_overlap = bool(slide_overlap)
        self.blur_detail = bool(blur_detail)
        self.checkpoint_backbone = bool(checkpoint_backbone)

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    @property
    def embed_dim(self) -> int:
        """Channels D of the embedding (the DAFormer head's decoder channels)."""
        return self.decode_head.channels

    # ------------------------------------------------------------------------------- helpers

    def _check_size(self, height: int, width: int) -> None:
        a = self.alignment
        if height % a or width % a:
            raise ValueError(
                f"HRDA: input {height}x{width} is not a multiple of {a} (output stride "
                f"{self.output_stride} / context scale {self.context_scale}), so the context and detail "
                f"grids would not align; pad or crop the input, or use slide inference with a window "
                f"that is a multiple of {a}.")

    def _encode(self, x: Tensor) -> list[Tensor]:
        if self.checkpoint_backbone and torch.is_grad_enabled():
            return list(checkpoint(self.backbone, x, use_reentrant=False))
        return self.backbone(x)

    def _detail_input(self, img: Tensor) -> Tensor:
        return rescale(rescale(img, 0.5), 2.0) if self.blur_detail else img

    def _detail_box(self, height: int, width: int, box: DetailBox | Sequence[int] | None,
                    generator: torch.Generator | None) -> DetailBox | None:
        crop = self.detail_crop_size
        if crop is None:
            if box is not None:
                raise ValueError("HRDA: detail_box given, but the model has no detail crop")
            return None
        if height < crop[0] or width < crop[1]:
            raise ValueError(f"HRDA: the training input {height}x{width} is smaller than the detail crop "
                             f"{crop[0]}x{crop[1]}")
        if box is None:
            return sample_detail_box(height, width, crop_size=crop, divisor=self.crop_divisor,
                                     allow_last_offset=self.allow_last_offset, generator=generator)
        y1, x1 = int(box[0]), int(box[1])
        o = self.output_stride
        if y1 % o or x1 % o or y1 < 0 or x1 < 0 or y1 + crop[0] > height or x1 + crop[1] > width:
            raise ValueError(f"HRDA: detail_box ({y1}, {x1}) must be multiples of the output stride {o} with "
                             f"the {crop[0]}x{crop[1]} crop inside the {height}x{width} input")
        return DetailBox(y1, x1, crop[0], crop[1])

    def _attention_tensor(self, attention: Tensor | float, like: Tensor) -> Tensor:
        if isinstance(attention, Tensor):
            return attention
        return like.new_full((like.shape[0], 1, *like.shape[2:]), attention)

    # -------------------------------------------------------------------------------- forward

    def forward(self, img: Tensor, *, detail_box: DetailBox | Sequence[int] | None = None,
                generator: torch.Generator | None = None) -> HRDAOutput:
        """Training forward on crops img [B, 3, H, W] (normalised; H, W multiples of ``alignment``).

        Args:
            img: the batch; one detail box for the whole batch, as the reference.
            detail_box: (y1, x1) of the detail crop (multiples of the output stride), or None to draw it
                with ``sample_detail_box``.
            generator: the (CPU) RNG of that draw; None: torch's global RNG.
        """
        height, width = img.shape[-2:]
        self._check_size(height, width)
        box = self._detail_box(height, width, detail_box, generator)
        context_features = self._encode(rescale(img, self.context_scale))
        detail_input = self._detail_input(img)
        detail_features = self._encode(detail_input if box is None else box.crop(detail_input))
        embedding, context_logits, detail_logits, attention = self.decode_head(
            context_features, detail_features)
        return self._output(context_features, embedding, context_logits, detail_logits, attention, box)

    def _output(self, context_features: list[Tensor], embedding: Tensor, context_logits: Tensor,
                detail_logits: Tensor, attention: Tensor | float, box: DetailBox | None) -> HRDAOutput:
        """Fuse the two scales (spec 1.4; masked to ``box`` when given) into the returned ``HRDAOutput``."""
        fused, scaled_context, attention = fuse_scales(
            context_logits, attention, detail_logits, box=box, output_stride=self.output_stride,
            context_scale=self.context_scale)
        return HRDAOutput(features=context_features, embedding=embedding, logits=fused,
                          detail_logits=detail_logits, context_logits=scaled_context,
                          attention=self._attention_tensor(attention, context_logits), detail_box=box)

    def _test_parts(self, img: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor, Tensor | float]:
        """Context features, embedding, context logits, window-averaged detail logits and attention."""
        n, _, height, width = img.shape
        self._check_size(height, width)
        context_features = self._encode(rescale(img, self.context_scale))
        detail_input = self._detail_input(img)
        crop = self.detail_crop_size
        boxes = None
        if self.slide_inference and crop is not None:
            stride = (crop[0] // 2, crop[1] // 2) if self.slide_overlap else crop
            boxes = slide_boxes((height, width), crop, stride)
            detail_input = torch.cat([detail_input[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], dim=0)
        detail_features = self._encode(detail_input)
        embedding, context_logits, detail_logits, attention = self.decode_head(
            context_features, detail_features)
        if boxes is not None:
            detail_logits = assemble_windows(detail_logits, boxes, n, self.output_stride, (height, width))
        return context_features, embedding, context_logits, detail_logits, attention

    def predict(self, img: Tensor) -> HRDAOutput:
        """Test-time forward (spec 1.6): img [N, 3, H, W] -> fused logits [N, C, H/4, W/4], no mask.

        Context: the whole input at s_L. Detail: c-windows with stride c/2 (or c), all batched through the
        backbone and the head in one pass (window-major), averaged by coverage count.
        """
        return self._output(*self._test_parts(img), None)

    def predict_branches(self, img: Tensor) -> HRDABranches:
        """Context-only and detail-only predictions and the attention map of ``predict(img)`` (spec 1.7)."""
        _, _, context_logits, detail_logits, attention = self._test_parts(img)
        fused, _, _ = fuse_scales(context_logits, attention, detail_logits, box=None,
                                  output_stride=self.output_stride, context_scale=self.context_scale)
        up = rescale(attention, 1 / self.context_scale) if isinstance(attention, Tensor) else attention
        attention_map = (up * fused.softmax(dim=1)).sum(dim=1, keepdim=True)
        return HRDABranches(context=rescale(context_logits, 1 / self.context_scale), detail=detail_logits,
                            attention=attention_map)

    def branch(self, which: Literal["context", "detail", "attention"]) -> HRDABranch:
        """A segmentor whose logits are one of ``predict_branches`` (for ``inference`` / ``slide_logits``)."""
        return HRDABranch(self, which=which)

    def extract_features(self, img: Tensor) -> list[Tensor]:
        """The backbone maps of the context input (spec 3.7: the feature distance compares these)."""
        return self._encode(rescale(img, self.context_scale))

    # ----------------------------------------------------------------------------------- loss

    def loss_terms(self, output: SegmentorOutput, label: Tensor, weight: Tensor | None = None
                   ) -> dict[str, Tensor]:
        """The weighted CE terms of one HRDA forward (spec 1.5).

        ``seg`` = (1 - lambda_l - lambda_d) CE(fused), ``detail`` = lambda_d CE(z^H) on the label and
        weight cropped with the detail box (when lambda_d > 0), ``context`` = lambda_l CE((1 - a) z^L)
        (when lambda_l > 0). Logits are resized to the (cropped) label size; CE is mmseg 0.16's.

        Args:
            output: an ``HRDAOutput`` of this model.
            label: [B, H, W] long at the input size, ``ignore_index`` allowed.
            weight: [B, H, W] per-pixel weights or None.
        """
        if not isinstance(output, HRDAOutput):
            raise TypeError(f"HRDA loss_terms needs an HRDAOutput, got {type(output).__name__}")
        size = label.shape[-2:]
        ce = self.ignore_index
        terms = {"seg": seg_ce(resize(output.logits.float(), size), label, weight, ignore_index=ce)
                 * (1 - self.lr_loss_weight - self.hr_loss_weight)}
        if self.lr_loss_weight > 0:
            terms["context"] = seg_ce(resize(output.context_logits.float(), size), label, weight,
                                      ignore_index=ce) * self.lr_loss_weight
        if self.hr_loss_weight > 0:
            box = output.detail_box
            if box is not None:
                label = box.crop(label)
                weight = None if weight is None else box.crop(weight)
            logits = resize(output.detail_logits.float(), label.shape[-2:])
            terms["detail"] = seg_ce(logits, label, weight, ignore_index=ce) * self.hr_loss_weight
        return terms


class HRDABranch(BaseSegmentor):
    """One ``--hrda-out`` view of an HRDA model as a segmentor: ``predict`` returns that branch as logits.

    ``attention`` has one channel (its "logits" are the attention map, not class scores).
    """

    def __init__(self, model: HRDASegmentor, *, which: Literal["context", "detail", "attention"]) -> None:
        super().__init__()
        if which not in ("context", "detail", "attention"):
            raise ValueError(f"HRDA branch must be context, detail or attention; got {which!r}")
        self.model = model
        self.which = which

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.model.backbone

    @property
    def num_classes(self) -> int:
        return 1 if self.which == "attention" else self.model.num_classes

    def forward(self, img: Tensor) -> SegmentorOutput:
        return self.predict(img)

    def predict(self, img: Tensor) -> SegmentorOutput:
        logits = getattr(self.model.predict_branches(img), self.which)
        return SegmentorOutput(features=[], embedding=None, logits=logits)


# ------------------------------------------------------------------------------------- builders


def build_hrda(cfg: ModelCfg, generator: torch.Generator | None = None) -> HRDASegmentor:
    """``model.segmentor=hrda``: the configured backbone + a DAFormer head + the scale attention.

    With ``generator`` every parameter is drawn from it. Raises ``ConfigError`` for unusable
    ``model.hrda`` values.
    """
    from dida.errors import ConfigError
    from dida.models.registry import build_backbone

    h = cfg.hrda
    if not (h.hr_loss_weight >= 0 and h.lr_loss_weight >= 0 and h.hr_loss_weight + h.lr_loss_weight <= 1):
        raise ConfigError("model.hrda.hr_loss_weight / lr_loss_weight: must be >= 0 with a sum <= 1")
    if h.fixed_attention is not None and not 0 <= h.fixed_attention <= 1:
        raise ConfigError(f"model.hrda.fixed_attention: must be in [0, 1] or null, got {h.fixed_attention}")
    if h.attention_embed_dim < 1:
        raise ConfigError(f"model.hrda.attention_embed_dim: must be >= 1, got {h.attention_embed_dim}")
    backbone = build_backbone(cfg)
    channels = getattr(backbone, "out_channels", None)
    if channels is None:
        raise TypeError(f"backbone '{cfg.backbone}' does not declare out_channels (see dida.models.base)")
    init = generator is None
    head = DAFormerHead(in_channels=channels, channels=cfg.decoder_channels, num_classes=cfg.num_classes,
                        dilations=cfg.aspp_dilations, dropout_ratio=cfg.dropout_ratio, init=init)
    attention = None
    if h.fixed_attention is None:
        attention = ScaleAttentionHead(channels, channels=h.attention_embed_dim,
                                       num_outputs=cfg.num_classes if h.attention_classwise else 1,
                                       dropout_ratio=cfg.dropout_ratio, init=init)
    try:
        model = HRDASegmentor(
            backbone, HRDAHead(head, attention, fixed_attention=h.fixed_attention), scales=h.scales,
            detail_crop_size=h.detail_crop_size, crop_divisor=h.crop_divisor,
            allow_last_offset=h.allow_last_offset, hr_loss_weight=h.hr_loss_weight,
            lr_loss_weight=h.lr_loss_weight, slide_inference=h.slide_inference, slide_overlap=h.slide_overlap,
            blur_detail=h.blur_detail, checkpoint_backbone=h.checkpoint_backbone)
    except ValueError as e:
        raise ConfigError(f"model.hrda: {e}") from None
    if generator is not None:
        model.init_weights(generator)
    return model


def infer_hrda_fields(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """``ModelCfg`` fields of an HRDA state dict: the DAFormer head's (``decode_head.head.*``) and
    ``hrda`` with the attention width and class-wise flag read from ``decode_head.scale_attention.*``.

    Without attention weights the model is the fixed-attention ablation; its constant is not stored, so
    the reference's ``fixedatt`` value 0.5 is assumed.
    """
    from dida.config import HRDACfg
    from dida.models.segmentor import infer_daformer_head_fields

    fields = infer_daformer_head_fields(sd, prefix="decode_head.head.")
    key = "decode_head.scale_attention.conv_seg.weight"
    if key in sd:
        w = sd[key]
        classwise = int(w.shape[0]) != 1 or fields.get("num_classes") == 1
        fields["hrda"] = HRDACfg(attention_embed_dim=int(w.shape[1]), attention_classwise=classwise)
    else:
        fields["hrda"] = HRDACfg(fixed_attention=0.5)
    return fields
