"""The foundation ViTs' published weight files: Hugging Face DINOv2 / DINOv3 ``model.safetensors``.

Owned by the model (``dida.models.registry`` declares them as the ``dinov2_*`` / ``dinov3_*`` backbones'
``WeightFormat``); the checkpoint readers call them through the registry.

Converted names are ``FoundationViT``'s: ``vit.`` + the installed ``transformers`` module's own names; the
pyramid is not in the files (its keys are the format's ``new_prefixes``: loading keeps its initialisation).

- ``"dinov2"``: ``facebook/dinov2-{small,base,large,giant}`` (``Dinov2Model``; ``Dinov2ForImageClassification``
  with its ``dinov2.`` prefix, ``classifier.*`` dropped), in the Hub layout (``encoder.layer.0.attention.
  attention.query``, the giant's fused SwiGLU ``mlp.weights_in``) or the transformers >= 5 module layout
  (``attention.q_proj``, ``mlp.gate_proj`` / ``mlp.up_proj``), converted to whichever the installed
  ``transformers`` uses.
- ``"dinov3"``: ``facebook/dinov3-vit*16*-pretrain-*`` (``DINOv3ViTModel``): blocks ``layer.N`` on the Hub,
  ``model.layer.N`` in transformers >= 5 modules.

Every key is mapped or refused (no silent leftovers).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from dida.errors import CheckpointError

__all__ = [
    "PYRAMID_PREFIX", "detect_dinov2_weights", "detect_dinov3_weights", "dinov2_weights_to_backbone",
    "dinov3_weights_to_backbone", "infer_foundation_fields",
]

StateDict = dict[str, torch.Tensor]
VIT_PREFIX = "vit."
PYRAMID_PREFIX = "pyramid."
_SHOW = 5

# DINOv2 block suffixes: Hub (transformers < 5 modules) -> transformers >= 5 modules.
_V2_HUB_TO_MODULE = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "mlp.weights_out": "mlp.down_proj",
}
_V2_FUSED, _V2_GATE, _V2_UP = "mlp.weights_in", "mlp.gate_proj", "mlp.up_proj"  # fused = cat([gate, up])
_V2_SAME = ("norm1", "norm2", "layer_scale1", "layer_scale2", "mlp.fc1", "mlp.fc2")
_V2_MODULE = set(_V2_HUB_TO_MODULE.values()) | {_V2_GATE, _V2_UP} | set(_V2_SAME)
_V2_EMBEDDINGS = {"embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
                  "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias"}
_V3_BLOCK = {"norm1", "norm2", "layer_scale1", "layer_scale2", "attention.q_proj", "attention.k_proj",
             "attention.v_proj", "attention.o_proj", "mlp.up_proj", "mlp.down_proj", "mlp.gate_proj"}
_V3_EMBEDDINGS = {"embeddings.cls_token", "embeddings.mask_token", "embeddings.register_tokens",
                  "embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.bias"}
_PARAM = re.compile(r"^(.+)\.(weight|bias|lambda1)$")


def _first(items: Any, n: int = _SHOW) -> str:
    items = list(items)
    return ", ".join(str(x) for x in items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------ the installed module's names


@functools.cache
def _module_keys(family: str) -> frozenset[str]:
    """State-dict keys of tiny ``transformers`` models of ``family`` (plain and gated MLP), to read the
    installed version's naming (it changed in transformers 5)."""
    from dida.models.foundation import require_transformers

    tf = require_transformers(f"converting {family} weights")
    keys: set[str] = set()
    for gated in (False, True):
        common = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "patch_size": 2,
                  "image_size": 4}
        if family == "dinov2":
            keys |= set(tf.Dinov2Model(tf.Dinov2Config(use_swiglu_ffn=gated, **common)).state_dict())
        else:
            cfg = tf.DINOv3ViTConfig(intermediate_size=8, use_gated_mlp=gated, **common)
            keys |= set(tf.DINOv3ViTModel(cfg).state_dict())
    return frozenset(keys)


# ------------------------------------------------------------------------------------------ DINOv2


def _strip_v2(key: str) -> str:
    return key.removeprefix("dinov2.")


def detect_dinov2_weights(sd: Mapping[str, Any]) -> str | None:
    """``"dinov2"`` for a Hugging Face DINOv2 state dict (either layout, or ``FoundationViT``'s own names)."""
    keys = {_strip_v2(k.removeprefix(VIT_PREFIX)) for k in sd}
    found = "embeddings.patch_embeddings.projection.weight" in keys and "encoder.layer.0.layer_scale1.lambda1" in keys
    return "dinov2" if found else None


def dinov2_weights_to_backbone(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """A DINOv2 state dict -> (``FoundationViT`` state dict without the pyramid, dropped ``classifier.*`` keys).

    Raises:
        CheckpointError: a key that is not a DINOv2 tensor, or half of a gated MLP projection.
    """
    module = _module_keys("dinov2")
    hub_names = "encoder.layer.0.attention.q_proj.weight" not in module  # transformers < 5
    fused_names = "encoder.layer.0.mlp.weights_in.weight" in module
    out: StateDict = {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(PYRAMID_PREFIX):  # FoundationViT's own state dict: kept as it is
            out[key] = value
            continue
        k = _strip_v2(key.removeprefix(VIT_PREFIX))
        if k.startswith("classifier."):
            dropped.append(key)
        elif k in _V2_EMBEDDINGS or k in ("layernorm.weight", "layernorm.bias"):
            out[VIT_PREFIX + k] = value
        elif (m := re.match(r"^encoder\.layer\.(\d+)\.(.+)$", k)) and (p := _PARAM.match(m.group(2))):
            base, (name, kind) = f"{VIT_PREFIX}encoder.layer.{m.group(1)}.", p.groups()
            name = _V2_HUB_TO_MODULE.get(name, name)
            if name == _V2_FUSED:
                gate, up = value.chunk(2, dim=0)
                halves.setdefault(f"{base}#{kind}", {}).update({_V2_GATE: gate, _V2_UP: up})
            elif name not in _V2_MODULE:
                unknown.append(key)
            elif name in (_V2_GATE, _V2_UP):
                halves.setdefault(f"{base}#{kind}", {})[name] = value
            else:
                if hub_names:
                    name = {v: h for h, v in _V2_HUB_TO_MODULE.items()}.get(name, name)
                out[f"{base}{name}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys in a DINOv2 state dict: {_first(unknown)}")
    for where, parts in halves.items():
        base, kind = where.split("#")
        if set(parts) != {_V2_GATE, _V2_UP}:
            raise CheckpointError(f"{base}mlp: the gate and up projections must both be present")
        if fused_names:
            out[f"{base}{_V2_FUSED}.{kind}"] = torch.cat([parts[_V2_GATE], parts[_V2_UP]], dim=0)
        else:
            out[f"{base}{_V2_GATE}.{kind}"] = parts[_V2_GATE].contiguous()
            out[f"{base}{_V2_UP}.{kind}"] = parts[_V2_UP].contiguous()
    return out, dropped


# ------------------------------------------------------------------------------------------ DINOv3


def detect_dinov3_weights(sd: Mapping[str, Any]) -> str | None:
    """``"dinov3"`` for a Hugging Face DINOv3 ViT state dict (either layout, or ``FoundationViT``'s names)."""
    keys = {k.removeprefix(VIT_PREFIX) for k in sd}
    found = "embeddings.patch_embeddings.weight" in keys and "embeddings.register_tokens" in keys and any(
        re.match(r"^(model\.)?layer\.0\.layer_scale1\.lambda1$", k) for k in keys)
    return "dinov3" if found else None


def dinov3_weights_to_backbone(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """A DINOv3 ViT state dict -> (``FoundationViT`` state dict without the pyramid, [] dropped).

    Raises:
        CheckpointError: a key that is not a DINOv3 ViT tensor.
    """
    layer = "model.layer." if "model.layer.0.norm1.weight" in _module_keys("dinov3") else "layer."
    out: StateDict = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(PYRAMID_PREFIX):
            out[key] = value
            continue
        k = key.removeprefix(VIT_PREFIX)
        if k in _V3_EMBEDDINGS or k in ("norm.weight", "norm.bias"):
            out[VIT_PREFIX + k] = value
        elif ((m := re.match(r"^(?:model\.)?layer\.(\d+)\.(.+)$", k)) and (p := _PARAM.match(m.group(2)))
              and p.group(1) in _V3_BLOCK):
            out[f"{VIT_PREFIX}{layer}{m.group(1)}.{m.group(2)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys in a DINOv3 ViT state dict: {_first(unknown)}")
    return out, []


# ------------------------------------------------------------------------------------- config fields


def infer_foundation_fields(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``ModelCfg`` fields from a ``FoundationViT`` state dict (converted weights or a segmentor's
    ``backbone.*`` part), or {} if it is not one.

    The ``VIT_VARIANTS`` entry of the same family and architecture; otherwise the family's variant of the
    same width (or its first) with ``model.vit`` overrides. Head counts are not stored in weights:
    ``hidden // 64`` (every published model) unless a variant matches.
    """
    from dida.config import ViTCfg
    from dida.models.foundation import VIT_VARIANTS

    p = VIT_PREFIX
    if f"{p}embeddings.patch_embeddings.projection.weight" in sd:
        family, patch_key, blocks = "dinov2", f"{p}embeddings.patch_embeddings.projection.weight", r"encoder\.layer"
    elif f"{p}embeddings.patch_embeddings.weight" in sd and f"{p}embeddings.register_tokens" in sd:
        family, patch_key, blocks = "dinov3", f"{p}embeddings.patch_embeddings.weight", r"(?:model\.)?layer"
    else:
        return {}
    hidden, patch = int(sd[patch_key].shape[0]), int(sd[patch_key].shape[-1])
    layers = len({m.group(1) for k in sd if (m := re.match(rf"^{re.escape(p)}{blocks}\.(\d+)\.", k))})
    gated = any(".mlp.gate_proj." in k or ".mlp.weights_in." in k for k in sd)
    image_size = None
    if family == "dinov2":
        grid = math.isqrt(int(sd[f"{p}embeddings.position_embeddings"].shape[1]) - 1)
        image_size = grid * patch
    same = [n for n, v in VIT_VARIANTS.items() if v.family == family and v.hidden_size == hidden
            and v.num_layers == layers and v.patch_size == patch and v.gated_mlp == gated
            and (image_size is None or v.image_size == image_size)]
    if same:
        return {"backbone": same[0]}
    family_names = [n for n, v in VIT_VARIANTS.items() if v.family == family and v.gated_mlp == gated]
    width = [n for n in family_names if VIT_VARIANTS[n].hidden_size == hidden]
    name = (width or family_names)[0]
    vit = ViTCfg(hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64), patch_size=patch,
                 image_size=image_size)
    return {"backbone": name, "vit": vit}
