"""Telling what a checkpoint holds: its format, its models and the architecture it was written for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dida.checkpoint.formats import detect_format, is_tensor_dict, split_mmcv_state_dict, unwrap
from dida.checkpoint.load import model_cfg_from_checkpoint

__all__ = ["describe_checkpoint"]


def describe_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What ``ckpt`` holds.

    Returns:
        ``format`` (``detect_format``), ``parts`` (model name -> tensor count: ``model`` / ``ema_model`` /
        ``imnet_model`` for training checkpoints, ``weights`` for single-model files), ``model_cfg`` (the
        ``ModelCfg`` it was written for, or None) and ``iteration`` (or None).

    Raises:
        CheckpointError: an unknown layout.
    """
    fmt = detect_format(ckpt)
    if fmt == "dida":
        parts = {k: len(ckpt[k]) for k in ("model", "ema_model") if is_tensor_dict(ckpt.get(k))}
        iteration = ckpt.get("iteration")
    elif fmt == "mmcv":
        parts = {k: len(v) for k, v in split_mmcv_state_dict(unwrap(ckpt)).items()}
        meta = ckpt.get("meta")
        iteration = meta.get("iter") if isinstance(meta, Mapping) else None
    else:
        parts, iteration = {"weights": len(unwrap(ckpt))}, None
    return {"format": fmt, "parts": parts, "model_cfg": model_cfg_from_checkpoint(ckpt), "iteration": iteration}
