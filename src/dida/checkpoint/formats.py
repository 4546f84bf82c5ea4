"""Recognising what a checkpoint holds, and taking its containers apart.

Formats (``detect_format``):

- ``"dida"``: this project's own files (``format: dida``; see ``dida.checkpoint.training``).
- ``"mmcv"``: DAFormer / DIDA / HRDA / MIC training checkpoints (``state_dict`` with ``model.`` /
  ``ema_model.`` / ``imnet_model.`` prefixes, ``meta``, ``optimizer``).
- ``"segmentor"``: a bare segmentor state dict (``backbone.*``, ``decode_head.*``).
- a backbone family's published weight files, as its ``WeightFormat`` in ``dida.models.registry``
  recognises them (MiT: ``"mit"`` for the official ImageNet files, ``"hf"`` for Hugging Face SegFormer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from dida.errors import CheckpointError

if TYPE_CHECKING:
    from dida.models.registry import WeightFormat

__all__ = [
    "MMCV_PREFIXES", "detect_format", "detect_weight_format", "first", "is_tensor_dict", "split_mmcv_state_dict",
    "strip_prefix", "unwrap",
]

MMCV_PREFIXES = ("model.", "ema_model.", "imnet_model.")
_SHOW = 5  # offending keys listed in error messages

StateDict = dict[str, torch.Tensor]


def first(items: Iterable[Any], n: int = _SHOW) -> str:
    """The first ``n`` items joined by commas, with the count of the rest."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return f"{shown}{f' ... (+{len(items) - n} more)' if len(items) > n else ''}"


def strip_prefix(sd: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove ``prefix`` from the keys that start with it (other keys unchanged); returns a new dict."""
    n = len(prefix)
    return {(k[n:] if isinstance(k, str) and k.startswith(prefix) else k): v for k, v in sd.items()}


def is_tensor_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors (a state dict)."""
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The tensor dict inside ``{'state_dict': ...}`` / ``{'model': ...}`` or ``obj`` itself."""
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if is_tensor_dict(inner):
            return dict(inner)
    return dict(obj)


def detect_weight_format(sd: Mapping[str, Any]) -> tuple[WeightFormat, str] | None:
    """The registered backbone weight format that recognises ``sd`` (unwrapped), with its label."""
    from dida.models.registry import weight_formats

    for fmt in weight_formats():
        label = fmt.detect(sd)
        if label is not None:
            return fmt, label
    return None


def detect_format(obj: Mapping[str, Any]) -> str:
    """``"dida"``, ``"mmcv"``, ``"segmentor"`` or a backbone weight-format label (``"mit"``, ``"hf"``).

    Raises:
        CheckpointError: when none applies.
    """
    if obj.get("format") == "dida":
        return "dida"
    sd = strip_prefix(unwrap(obj), "module.")
    keys = list(sd)
    if any(k.startswith(MMCV_PREFIXES) and ".backbone." in k for k in keys):
        return "mmcv"
    if any(k.startswith("backbone.") for k in keys):
        return "segmentor"
    found = detect_weight_format(sd)
    if found is not None:
        return found[1]
    raise CheckpointError(
        "not a MiT / SegFormer / DAFormer / DIDA checkpoint, nor the weights of another registered backbone; "
        f"its first keys are {first(keys)}"
    )


def split_mmcv_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, StateDict]:
    """Split an mmcv UDA state dict into ``{"model": ..., "ema_model": ..., "imnet_model": ...}``.

    Every key is popped into exactly one sub-model.

    Raises:
        CheckpointError: keys outside the three known prefixes.
    """
    rest = dict(strip_prefix(sd, "module."))
    parts: dict[str, StateDict] = {}
    for prefix in MMCV_PREFIXES:
        keys = [k for k in rest if k.startswith(prefix)]
        if keys:
            parts[prefix[:-1]] = {k[len(prefix):]: rest.pop(k) for k in keys}
    if rest:
        raise CheckpointError(f"unexpected keys outside model./ema_model./imnet_model.: {first(rest)}")
    return parts
