"""The tables of backbones and segmentors: the one place that lists them.

Configuration validation (``model.backbone``, ``model.segmentor``), the command line, evaluation,
inference, the bank builder and checkpoint loading all read these two dicts. Adding a backbone or a
segmentor is a builder plus one entry here (or, from outside the package, one ``BACKBONES[name] = ...``
before the configuration is loaded; see ``docs/design.md``).

- ``BACKBONES[name]``: ``BackboneEntry(build, weights)``. ``build(model_cfg)`` returns the backbone
  module (``forward(img) -> list of maps``, with ``out_channels`` and ``strides``); ``weights`` says how
  the family's published weight files are recognised, converted to the backbone's names and described
  (``WeightFormat``), or None when it has none.
- ``SEGMENTORS[name]``: ``SegmentorEntry(build, detect, infer_fields)``. ``build(model_cfg, generator)``
  returns a ``BaseSegmentor``; ``detect(state_dict)`` recognises that segmentor's checkpoints and
  ``infer_fields(state_dict)`` reads its head's ``ModelCfg`` fields from the tensor shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from dida.config import ModelCfg
    from dida.models.base import BaseSegmentor

__all__ = [
    "BACKBONES", "SEGMENTORS", "BackboneEntry", "SegmentorEntry", "WeightFormat", "build_backbone",
    "build_model", "weight_formats",
]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightFormat:
    """How a backbone family's published weight files are read.

    Attributes:
        name: the family ("mit").
        detect: ``detect(state_dict) -> label or None``: the label of the file format (e.g. "mit", "hf")
            when ``state_dict`` (unwrapped, ``module.`` stripped) is such a file.
        convert: ``convert(state_dict) -> (backbone state dict, dropped keys)`` in the backbone's names.
        infer_fields: ``infer_fields(backbone state dict) -> ModelCfg fields`` ({} if not this family).
        new_prefixes: backbone key prefixes that the published files never hold (parts the backbone adds,
            e.g. a foundation ViT's feature pyramid): loading keeps their initialisation, every other key
            must match.
    """

    name: str
    detect: Callable[[Mapping[str, Any]], str | None]
    convert: Callable[[Mapping[str, torch.Tensor]], tuple[StateDict, list[str]]]
    infer_fields: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]]
    new_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackboneEntry:
    build: Callable[[ModelCfg], nn.Module]
    weights: WeightFormat | None = None
    description: str = ""


@dataclass(frozen=True)
class SegmentorEntry:
    build: Callable[[ModelCfg, torch.Generator | None], BaseSegmentor]
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    infer_fields: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]]
    description: str = ""


# ------------------------------------------------------------------------------------------ MiT


def _build_mit(cfg: ModelCfg) -> nn.Module:
    from dida.models.mit import build_mit

    return build_mit(cfg.backbone, embed_dims=cfg.embed_dims, num_heads=cfg.num_heads, depths=cfg.depths,
                     drop_path_rate=cfg.drop_path_rate, init=True)


def _mit_format() -> WeightFormat:
    from dida.models import mit_weights

    return WeightFormat("mit", mit_weights.detect_mit_weights, mit_weights.mit_weights_to_backbone,
                        mit_weights.infer_mit_fields)


# ------------------------------------------------------------------- foundation ViTs (DINOv2, DINOv3)


def _build_foundation_vit(cfg: ModelCfg) -> nn.Module:
    from dida.models.foundation import build_foundation_vit

    return build_foundation_vit(cfg)


def _foundation_entries() -> dict[str, BackboneEntry]:
    from dida.models import foundation_weights as fw
    from dida.models.foundation import VIT_VARIANTS

    formats = {
        "dinov2": WeightFormat("dinov2", fw.detect_dinov2_weights, fw.dinov2_weights_to_backbone,
                               fw.infer_foundation_fields, new_prefixes=(fw.PYRAMID_PREFIX,)),
        "dinov3": WeightFormat("dinov3", fw.detect_dinov3_weights, fw.dinov3_weights_to_backbone,
                               fw.infer_foundation_fields, new_prefixes=(fw.PYRAMID_PREFIX,)),
    }
    return {name: BackboneEntry(_build_foundation_vit, formats[v.family],
                                f"{v.hub} through transformers + simple feature pyramid (needs dida[hf])")
            for name, v in VIT_VARIANTS.items()}


# --------------------------------------------------------------------------------- the tables

MIT_WEIGHTS = _mit_format()

BACKBONES: dict[str, BackboneEntry] = {
    **{f"mit_b{i}": BackboneEntry(_build_mit, MIT_WEIGHTS, f"Mix Transformer (SegFormer) B{i}") for i in range(6)},
    **_foundation_entries(),
}


def _build_encoder_decoder(cfg: ModelCfg, generator: torch.Generator | None) -> BaseSegmentor:
    from dida.models.segmentor import build_encoder_decoder

    return build_encoder_decoder(cfg, generator)


def _detect_encoder_decoder(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("backbone.") for k in sd) and not any(
        k.startswith(("decode_head.scale_attention.", "decode_head.head.")) for k in sd)


def _infer_encoder_decoder(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    from dida.models.segmentor import infer_daformer_head_fields

    return infer_daformer_head_fields(sd, prefix="decode_head.")


def _build_hrda(cfg: ModelCfg, generator: torch.Generator | None) -> BaseSegmentor:
    from dida.models.hrda import build_hrda

    return build_hrda(cfg, generator)


def _detect_hrda(sd: Mapping[str, torch.Tensor]) -> bool:
    # decode_head.head.* without scale_attention.*: the fixed-attention ablation.
    return any(k.startswith("backbone.") for k in sd) and any(
        k.startswith(("decode_head.scale_attention.", "decode_head.head.")) for k in sd)


def _infer_hrda(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    from dida.models.hrda import infer_hrda_fields

    return infer_hrda_fields(sd)


SEGMENTORS: dict[str, SegmentorEntry] = {
    "encoder_decoder": SegmentorEntry(_build_encoder_decoder, _detect_encoder_decoder, _infer_encoder_decoder,
                                      "backbone + DAFormer head (DAFormer, DIDA)"),
    "hrda": SegmentorEntry(_build_hrda, _detect_hrda, _infer_hrda,
                           "backbone + DAFormer head on a context and a detail scale, fused by a learned "
                           "scale attention (HRDA, MIC(HRDA))"),
}


# ------------------------------------------------------------------------------------- builders


def weight_formats() -> list[WeightFormat]:
    """The distinct weight formats of the registered backbones (in table order)."""
    out: list[WeightFormat] = []
    for entry in BACKBONES.values():
        if entry.weights is not None and all(entry.weights is not f for f in out):
            out.append(entry.weights)
    return out


def _entry(table: Mapping[str, Any], name: str, key: str) -> Any:
    from dida.errors import ConfigError

    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown value '{name}'; known: {', '.join(table)}.") from None


def build_backbone(cfg: ModelCfg) -> nn.Module:
    """The backbone named by ``cfg.backbone``."""
    return _entry(BACKBONES, cfg.backbone, "model.backbone").build(cfg)


def build_model(cfg: ModelCfg, generator: torch.Generator | None = None) -> BaseSegmentor:
    """The segmentor described by ``cfg`` (``model.segmentor`` on ``model.backbone``).

    With ``generator`` every parameter is drawn from it (reproducible without touching the global RNG).
    ``cfg.pretrained`` is not read here: the training engine loads it into the backbone.

    Raises:
        ConfigError: the configuration describes no buildable model (a constructor refused its sizes).
    """
    from dida.errors import ConfigError

    entry = _entry(SEGMENTORS, cfg.segmentor, "model.segmentor")
    try:
        return entry.build(cfg, generator)
    except ValueError as e:
        raise ConfigError(f"model: {e} (check the model.* keys: dida train --help-config)") from None
