"""DAFormer's ImageNet feature distance as a training term (spec 5; ``uda.feature_distance``).

The student's last backbone map on the source crop is pulled towards that of a frozen ImageNet model on
thing-class cells. The frozen model is a segmentor of the student's kind, built independently (its own
random initialisation, as the reference builds a third model) and given the ImageNet weights of
``model.pretrained`` when set; its ``extract_features`` sees the same input scale as the student's
features (HRDA: the context scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from dida.models.base import BaseSegmentor
from dida.uda.feature_distance import feature_distance_loss, thing_mask
from dida.uda.terms.base import StepContext, Term, TermBuildContext

if TYPE_CHECKING:
    from dida.config import Config

__all__ = ["FeatureDistanceTerm", "build"]


class FeatureDistanceTerm(Term):
    """``loss/feat_dist = weight * mean ||f_student - f_imnet||_2`` over thing cells of the last map.

    Args:
        imnet_model: the frozen ImageNet segmentor (kept in eval mode, no gradients).
        weight: the loss weight (``imnet_feature_dist_lambda``).
        classes: classes of the thing mask (None: every cell).
        min_ratio: minimal purity of a cell's majority class.
        empty: what an empty mask gives: "zero" or "nan" (the reference: logged, no gradient).
        num_classes: C of the labels.
    """

    def __init__(self, imnet_model: BaseSegmentor, *, weight: float, classes: Sequence[int] | None,
                 min_ratio: float, empty: Literal["zero", "nan"], num_classes: int) -> None:
        super().__init__()
        self.imnet_model = imnet_model.eval().requires_grad_(False)
        self.weight = float(weight)
        self.classes = None if classes is None else tuple(int(c) for c in classes)
        self.min_ratio = float(min_ratio)
        self.empty: Literal["zero", "nan"] = empty
        self.num_classes = int(num_classes)

    def train(self, mode: bool = True) -> FeatureDistanceTerm:
        super().train(mode)
        self.imnet_model.eval()  # frozen: never in training mode
        return self

    def on_source(self, ctx: StepContext) -> dict[str, Tensor]:
        assert ctx.source_output is not None
        with torch.no_grad(), ctx.autocast():
            imnet_feat = self.imnet_model.extract_features(ctx.source_img)[-1]
        feat = ctx.source_output.features[-1]
        mask = None
        label = ctx.source_label
        if self.classes is not None:
            # Cell size relative to the label map, derived from the widths like the reference.
            scale = label.shape[-1] // feat.shape[-1]
            mask = thing_mask(label, scale, self.min_ratio, self.num_classes, self.classes, ctx.ignore_index)
            if mask.shape[-2:] != feat.shape[-2:]:
                raise ValueError(
                    f"feature distance: the {tuple(label.shape[-2:])} label map downscaled by {scale} gives "
                    f"{tuple(mask.shape[-2:])} cells, but the feature map is {tuple(feat.shape[-2:])}. Use a "
                    "crop size divisible by the backbone's output stride.")
        return {"loss/feat_dist": feature_distance_loss(feat, imnet_feat.detach(), mask, self.weight, self.empty)}


def build(cfg: Config, ctx: TermBuildContext) -> FeatureDistanceTerm:
    """The term from ``uda.feature_distance``; the ImageNet model from ``model`` (and ``model.pretrained``)."""
    from dida.checkpoint import load_checkpoint
    from dida.models import build_model

    imnet = build_model(cfg.model)
    if cfg.model.pretrained:
        load_checkpoint(imnet.backbone, cfg.model.pretrained)
    if cfg.train.amp == "bf16":
        # Frozen: no float32 master weights are needed, and bf16 weights spare autocast a cast per forward.
        imnet.to(torch.bfloat16)
    fd = cfg.uda.feature_distance
    return FeatureDistanceTerm(imnet, weight=fd.weight, classes=fd.classes, min_ratio=fd.scale_min_ratio,
                               empty=fd.empty_mask, num_classes=cfg.model.num_classes)
