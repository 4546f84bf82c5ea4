"""MiT's published weight files: the official SegFormer ImageNet files and Hugging Face SegFormer encoders.

Owned by the model (``dida.models.registry`` declares it as MiT's ``WeightFormat``); the checkpoint
readers call it through the registry and know nothing of MiT's key names.

- ``"mit"``: official SegFormer ImageNet MiT files (``mit_b5.pth``): MiT names already; the ImageNet
  classifier ``head.*`` is dropped.
- ``"hf"``: Hugging Face ``transformers`` SegFormer encoders (``.safetensors`` or ``.bin``), with or
  without the ``segformer.`` prefix, in the hub layout (``encoder.block.0.0.attention.self.query``) or the
  transformers >= 5 module layout (``stages.0.blocks.0.attention.q_proj``). Separate key/value projections
  are concatenated into ``attn.kv``; ``classifier.*`` / ``decode_head.*`` are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from dida.errors import CheckpointError

__all__ = [
    "convert_mit_state_dict", "detect_mit_weights", "hf_to_mit_state_dict", "infer_mit_fields",
    "mit_to_hf_state_dict", "mit_weights_to_backbone",
]

StateDict = dict[str, torch.Tensor]
_SHOW = 5


def _first(items: Any, n: int = _SHOW) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return f"{shown}{f' ... (+{len(items) - n} more)' if len(items) > n else ''}"


# Block-level suffixes: MiT name -> (HF hub layout, HF transformers >= 5 layout). "#k"/"#v" mark the
# two halves of MiT's fused kv projection, which HF keeps as separate key and value projections.
_HF_BLOCK = {
    "norm1": ("layer_norm_1", "layernorm_before"),
    "attn.q": ("attention.self.query", "attention.q_proj"),
    "attn.kv#k": ("attention.self.key", "attention.k_proj"),
    "attn.kv#v": ("attention.self.value", "attention.v_proj"),
    "attn.sr": ("attention.self.sr", "attention.sequence_reduction.sequence_reduction"),
    "attn.norm": ("attention.self.layer_norm", "attention.sequence_reduction.layer_norm"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "norm2": ("layer_norm_2", "layernorm_after"),
    "mlp.fc1": ("mlp.dense1", "mlp.fc1"),
    "mlp.dwconv.dwconv": ("mlp.dwconv.dwconv", "mlp.dwconv.dwconv"),
    "mlp.fc2": ("mlp.dense2", "mlp.fc2"),
}
_HF_PATCH = {"proj": "proj", "norm": "layer_norm"}  # MiT patch_embed{s}.<x> -> HF ....<x>
_HF_LAYOUTS = ("hub", "v5")
_HF_PATTERNS = {
    "hub": (
        re.compile(r"^encoder\.block\.(\d+)\.(\d+)\.(.+)\.(weight|bias)$"),
        re.compile(r"^encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(weight|bias)$"),
        re.compile(r"^encoder\.layer_norm\.(\d+)\.(weight|bias)$"),
    ),
    "v5": (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)$"),
        re.compile(r"^stages\.(\d+)\.patch_embeddings\.(proj|layer_norm)\.(weight|bias)$"),
        re.compile(r"^stages\.(\d+)\.layer_norm\.(weight|bias)$"),
    ),
}
_HF_DROPPED_PREFIXES = ("classifier.", "decode_head.")


def _hf_layout(sd: Mapping[str, Any]) -> str | None:
    keys = [k[len("segformer."):] if k.startswith("segformer.") else k for k in sd]
    if any(k.startswith("encoder.patch_embeddings.") for k in keys):
        return "hub"
    if any(re.match(r"^stages\.\d+\.patch_embeddings\.", k) for k in keys):
        return "v5"
    return None


def hf_to_mit_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Map a Hugging Face SegFormer encoder state dict onto MiT names.

    Returns:
        (MiT state dict, names of the dropped non-encoder keys: ``classifier.*``, ``decode_head.*``).

    Raises:
        CheckpointError: a key that is neither an encoder tensor nor a known head, or a key/value
            projection without its partner.
    """
    layout = _hf_layout(sd)
    if layout is None:
        raise CheckpointError("not a Hugging Face SegFormer state dict (no encoder patch embeddings)")
    inverse_block = {hf[_HF_LAYOUTS.index(layout)]: mit for mit, hf in _HF_BLOCK.items()}
    block_re, patch_re, norm_re = _HF_PATTERNS[layout]
    out: StateDict = {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in sd.items():
        k = key[len("segformer."):] if key.startswith("segformer.") else key
        if k.startswith(_HF_DROPPED_PREFIXES):
            dropped.append(key)
            continue
        if m := block_re.match(k):
            s, i, name, kind = m.groups()
            mit = inverse_block.get(name)
            if mit is None:
                unknown.append(key)
                continue
            base = f"block{int(s) + 1}.{i}.{mit.split('#')[0]}.{kind}"
            if "#" in mit:
                halves.setdefault(base, {})[mit.split("#")[1]] = value
            else:
                out[base] = value
        elif m := patch_re.match(k):
            s, name, kind = m.groups()
            mit_name = "proj" if name == "proj" else "norm"
            out[f"patch_embed{int(s) + 1}.{mit_name}.{kind}"] = value
        elif m := norm_re.match(k):
            s, kind = m.groups()
            out[f"norm{int(s) + 1}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"unexpected keys in a Hugging Face SegFormer state dict: {_first(unknown)}"
        )
    for base, parts in halves.items():
        if set(parts) != {"k", "v"}:
            raise CheckpointError(f"{base}: the key and value projections must both be present")
        out[base] = torch.cat([parts["k"], parts["v"]], dim=0)
    return out, dropped


def mit_to_hf_state_dict(
    sd: Mapping[str, torch.Tensor], layout: str = "hub", prefix: str = "segformer."
) -> StateDict:
    """Inverse of ``hf_to_mit_state_dict``: MiT names -> Hugging Face names (``kv`` split in halves).

    Args:
        sd: MiT backbone state dict.
        layout: ``"hub"`` (the names on the Hugging Face hub) or ``"v5"`` (transformers >= 5 modules).
        prefix: prepended to every key (``"segformer."`` or ``""``).
    """
    if layout not in _HF_LAYOUTS:
        raise ValueError(f"layout must be one of {_HF_LAYOUTS}")
    li = _HF_LAYOUTS.index(layout)
    out: StateDict = {}
    for key, value in sd.items():
        if m := re.match(r"^block(\d)\.(\d+)\.(.+)\.(weight|bias)$", key):
            s, i, name, kind = m.groups()
            stage = int(s) - 1
            base = f"encoder.block.{stage}.{i}." if layout == "hub" else f"stages.{stage}.blocks.{i}."
            if name == "attn.kv":
                k, v = value.chunk(2, dim=0)
                out[f"{prefix}{base}{_HF_BLOCK['attn.kv#k'][li]}.{kind}"] = k.clone()
                out[f"{prefix}{base}{_HF_BLOCK['attn.kv#v'][li]}.{kind}"] = v.clone()
            else:
                out[f"{prefix}{base}{_HF_BLOCK[name][li]}.{kind}"] = value
        elif m := re.match(r"^patch_embed(\d)\.(proj|norm)\.(weight|bias)$", key):
            s, name, kind = m.groups()
            stage = int(s) - 1
            base = (f"encoder.patch_embeddings.{stage}." if layout == "hub"
                    else f"stages.{stage}.patch_embeddings.")
            out[f"{prefix}{base}{_HF_PATCH[name]}.{kind}"] = value
        elif m := re.match(r"^norm(\d)\.(weight|bias)$", key):
            s, kind = m.groups()
            stage = int(s) - 1
            base = f"encoder.layer_norm.{stage}." if layout == "hub" else f"stages.{stage}.layer_norm."
            out[f"{prefix}{base}{kind}"] = value
        else:
            raise ValueError(f"not a MiT key: {key}")
    return out


def convert_mit_state_dict(sd: Mapping[str, Any]) -> StateDict:
    """Any MiT ImageNet / HF SegFormer encoder state dict -> MiT names, classifier dropped.

    Accepts a raw dict or one wrapped in ``state_dict`` / ``model``, with or without a ``module.``
    prefix. A no-op (copy) for an already-converted MiT state dict.
    """
    from dida.checkpoint.formats import strip_prefix, unwrap

    return mit_weights_to_backbone(strip_prefix(unwrap(sd), "module."))[0]


def detect_mit_weights(sd: Mapping[str, Any]) -> str | None:
    """``"mit"`` for an official MiT state dict, ``"hf"`` for a Hugging Face SegFormer one, else None.

    ``sd`` is already unwrapped (no ``state_dict`` / ``model`` / ``module.`` wrappers).
    """
    if any(k.startswith("patch_embed1.") for k in sd):
        return "mit"
    if _hf_layout(sd) is not None:
        return "hf"
    return None


def mit_weights_to_backbone(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """An official MiT or HF SegFormer state dict -> (MiT backbone state dict, dropped keys)."""
    if _hf_layout(sd) is not None:
        return hf_to_mit_state_dict(sd)
    dropped = [k for k in sd if k.startswith("head.")]
    return {k: v for k, v in sd.items() if not k.startswith("head.")}, dropped


def infer_mit_fields(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``ModelCfg`` backbone fields from a MiT backbone state dict (MiT names), or {} if it is not one.

    Head counts are not stored in weights: a standard variant's heads are used (otherwise
    ``max(1, dim // 64)``).
    """
    from dida.models.mit import MIT_VARIANTS

    if "patch_embed1.proj.weight" not in sd:
        return {}
    dims = [int(sd[f"patch_embed{s}.proj.weight"].shape[0]) for s in range(1, 5)]
    depths = []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"^block{s}\.(\d+)\.", k))}
        depths.append(len(idx))
    fields: dict[str, Any] = {}
    match = [n for n, v in MIT_VARIANTS.items() if list(v.embed_dims) == dims and list(v.depths) == depths]
    if match:
        fields["backbone"] = match[0]
    else:
        same_dims = [n for n, v in MIT_VARIANTS.items() if list(v.embed_dims) == dims]
        fields["backbone"] = same_dims[-1] if same_dims else "mit_b5"
        fields["embed_dims"] = dims
        fields["depths"] = depths
        if not same_dims:
            fields["num_heads"] = [max(1, d // 64) for d in dims]
    return fields
