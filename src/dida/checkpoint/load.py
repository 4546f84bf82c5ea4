"""Strictly loading any supported checkpoint into a model, and telling which model a checkpoint holds.

Loading is strict: missing, unexpected or wrongly-shaped tensors raise ``CheckpointError`` naming the
first offenders. Backbone weight files (ImageNet, Hugging Face) are converted by the backbone family's own
``WeightFormat`` (``dida.models.registry``); segmentor and training checkpoints load into the segmentor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dida.checkpoint.formats import (
    detect_format,
    detect_weight_format,
    first,
    is_tensor_dict,
    split_mmcv_state_dict,
    strip_prefix,
    unwrap,
)
from dida.checkpoint.io import describe_source, read_checkpoint
from dida.errors import CheckpointError
from dida.models.base import backbone_of

if TYPE_CHECKING:
    from dida.config import ModelCfg

__all__ = [
    "first_nonfinite", "infer_model_fields", "load_checkpoint", "load_pretrained", "load_state_dict_strict",
    "model_cfg_from_checkpoint",
]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------- strict loading


def _class_count_problem(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    for key in expected:
        if not key.endswith("conv_seg.weight") or key not in sd:
            continue
        if sd[key].ndim == 4 and sd[key].shape[1:] == expected[key].shape[1:]:
            n, m = sd[key].shape[0], expected[key].shape[0]
            if n != m:
                return f"checkpoint has {n} classes, model has {m}"
    return None


def load_state_dict_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str, what: str) -> int:
    """Load ``sd`` into ``module`` only if names and shapes match exactly; return the tensor count.

    A missing BatchNorm ``num_batches_tracked`` counter is tolerated (it does not affect the output:
    BN momentum is fixed); everything else must match.

    Raises:
        CheckpointError: listing the class-count mismatch, the first missing / unexpected keys and
            shape mismatches.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    not_tensor = [k for k in sd if k in expected and not isinstance(sd[k], torch.Tensor)]
    mismatched = [
        f"{k}: checkpoint {list(sd[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched or not_tensor:
        parts = []
        classes = _class_count_problem(sd, expected)
        if classes:
            parts.append(classes)
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({first(mismatched, 3)})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({first(unexpected)})")
        if not_tensor:
            parts.append(f"non-tensor values ({first(not_tensor)})")
        guess = _guess_architecture(sd)
        hint = f" The checkpoint looks like {guess}." if guess else ""
        raise CheckpointError(
            f"{source}: cannot load {what}: {'; '.join(parts)}.{hint} Build the model with the "
            "checkpoint's architecture and class count (e.g. the model.* config keys), or pick the "
            "right checkpoint."
        )
    bad = first_nonfinite(sd)
    if bad is not None:
        raise CheckpointError(
            f"{source}: cannot load {what}: the tensor {bad} holds non-finite values (NaN or inf), so every "
            "prediction would be garbage (the run that wrote it diverged). Use an earlier checkpoint (an iter_N.pth from before the "
            "divergence) or train again with a lower optim.lr."
        )
    full = dict(sd)
    for k in expected:
        if k not in full:
            full[k] = expected[k]  # a tolerated num_batches_tracked
    module.load_state_dict(full, strict=True)
    return len(sd)


def first_nonfinite(sd: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``sd`` holding NaN or inf, or None."""
    for key, value in sd.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def _guess_architecture(sd: Mapping[str, torch.Tensor]) -> str:
    try:
        fields = infer_model_fields(sd)
    except Exception:  # a guess for an error message must never mask the real error
        return ""
    if not fields or "backbone" not in fields:
        return ""
    if fields.get("embed_dims") is not None:
        desc = f"a custom MiT with embed_dims {fields['embed_dims']} and depths {fields['depths']}"
    else:
        desc = fields["backbone"]
    if fields.get("segmentor") not in (None, "encoder_decoder"):
        desc += f" ({fields['segmentor']})"
    if "num_classes" in fields:
        desc += f", {fields['num_classes']} classes"
    return desc


def _load_backbone_file(model: nn.Module, obj: Mapping[str, Any], source: str, info: dict[str, Any]) -> None:
    sd = strip_prefix(unwrap(obj), "module.")
    found = detect_weight_format(sd)
    assert found is not None
    fmt, label = found
    try:
        sd, dropped = fmt.convert(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    info["dropped"] = dropped
    info["target"] = "backbone"
    target = backbone_of(model)
    # Parts the backbone adds to the published model (WeightFormat.new_prefixes) keep their initialisation.
    kept = {k: v for k, v in target.state_dict().items() if k.startswith(fmt.new_prefixes) and k not in sd}
    info["kept"] = sorted(kept)
    info["num_tensors"] = load_state_dict_strict(target, {**kept, **sd}, source, f"the {label} backbone") - len(kept)
    log.info("loaded %d backbone tensors from %s (%s; dropped %d)", info["num_tensors"], source, label,
             len(dropped))


def _select_state_dict(obj: Mapping[str, Any], fmt: str, which: str, source: str,
                       info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of sub-model ``which`` in a dida / mmcv / segmentor checkpoint."""
    if fmt == "dida":
        if which not in ("model", "ema_model"):
            raise CheckpointError(f"{source}: a dida checkpoint holds 'model' and 'ema_model', not {which!r}")
        sd = obj.get(which)
        if not is_tensor_dict(sd):
            raise CheckpointError(f"{source}: this dida checkpoint has no {which!r} weights")
        info["iteration"] = obj.get("iteration")
        return dict(sd)
    if fmt == "mmcv":
        if which not in ("model", "ema_model", "imnet_model"):
            raise CheckpointError(
                f"{source}: an mmcv UDA checkpoint holds model / ema_model / imnet_model, not {which!r}"
            )
        try:
            parts = split_mmcv_state_dict(unwrap(obj))
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if which not in parts:
            raise CheckpointError(f"{source}: no {which}.* weights in this checkpoint (has {', '.join(parts)})")
        info["dropped"] = [f"{name}.* ({len(p)} tensors)" for name, p in parts.items() if name != which]
        meta = obj.get("meta")
        if isinstance(meta, Mapping) and isinstance(meta.get("iter"), int):
            info["iteration"] = meta["iter"]
        return parts[which]
    return strip_prefix(unwrap(obj), "module.")


def load_checkpoint(
    model: nn.Module,
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    which: str = "model",
    *,
    allow_pickle: bool = False,
    source: str | os.PathLike[str] | None = None,
    segmentor_only: bool = False,
) -> dict[str, Any]:
    """Load any supported checkpoint into a segmentor (or a bare backbone), strictly.

    Args:
        model: a segmentor (``dida.models.BaseSegmentor``), or a bare backbone (then only the backbone
            part of the file is used).
        path_or_dict: a file, or an already-read checkpoint dict.
        which: the sub-model of an mmcv (``model``/``ema_model``/``imnet_model``) or dida
            (``model``/``ema_model``) checkpoint; ignored for single-model files.
        allow_pickle: trust the file (unsafe unpickling).
        source: the file an already-read dict came from, named in error messages.
        segmentor_only: refuse a file holding only a backbone's weights (ImageNet / Hugging Face
            pretraining): loaded into a segmentor, its head would stay random (``test``, ``infer``,
            ``bank build``, ``export``).

    Returns:
        info dict: ``source``, ``format``, ``which``, ``target`` (``"segmentor"`` or ``"backbone"``),
        ``num_tensors`` loaded, ``dropped`` (keys deliberately left out), ``iteration`` (if known).

    Raises:
        CheckpointError: unreadable file, unknown layout, missing sub-model, any key/shape mismatch, a NaN or
            inf tensor, or (``segmentor_only``) backbone weights alone.
    """
    from dida.models.base import BaseSegmentor

    if isinstance(path_or_dict, Mapping):
        obj, source = dict(path_or_dict), describe_source(source)
    else:
        obj, source = read_checkpoint(path_or_dict, allow_pickle=allow_pickle), describe_source(path_or_dict)
    try:
        fmt = detect_format(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    info: dict[str, Any] = {"source": source, "format": fmt, "which": which, "dropped": [], "iteration": None}
    if fmt not in ("dida", "mmcv", "segmentor"):
        if segmentor_only:
            raise CheckpointError(
                f"{source}: holds only the weights of a backbone ({fmt} format, e.g. ImageNet or Hugging Face "
                "pretraining), no segmentation head: its predictions would come from a random head. Give a "
                "trained checkpoint (a run's latest.pth, a converted mmcv checkpoint, an export), or use this "
                f"file to start a training run: model.pretrained={source}."
            )
        _load_backbone_file(model, obj, source, info)
        return info

    sd = _select_state_dict(obj, fmt, which, source, info)
    if isinstance(model, BaseSegmentor):
        info["target"] = "segmentor"
        info["num_tensors"] = load_state_dict_strict(model, sd, source, f"{which} weights ({fmt})")
    else:
        backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        rest = [k for k in sd if not k.startswith("backbone.")]
        bad = [k for k in rest if not k.startswith("decode_head.")]
        if bad:
            raise CheckpointError(f"{source}: unexpected keys {first(bad)}")
        info["dropped"] = info["dropped"] + ([f"decode_head.* ({len(rest)} tensors)"] if rest else [])
        info["target"] = "backbone"
        info["num_tensors"] = load_state_dict_strict(
            backbone_of(model), backbone, source, f"the {which} backbone ({fmt})"
        )
    log.info("loaded %d tensors of %s from %s (%s)", info["num_tensors"], which, source, fmt)
    return info


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    allowed_missing: Iterable[str] = (),
    allowed_unexpected: Iterable[str] = (),
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Load a backbone's published weights (e.g. ImageNet MiT, HF SegFormer) into ``model``'s backbone.

    Strict by default; otherwise the missing / unexpected sets must equal the allowed ones exactly
    (keys named in the backbone's terms, classifier already dropped).
    """
    allowed_missing, allowed_unexpected = set(allowed_missing), set(allowed_unexpected)
    if not allowed_missing and not allowed_unexpected:
        info = load_checkpoint(model, path, allow_pickle=allow_pickle)
        if info["format"] in ("dida", "mmcv", "segmentor"):
            log.info("%s is a %s checkpoint, not an ImageNet backbone; loaded it as such", path, info["format"])
        return info
    sd = strip_prefix(unwrap(read_checkpoint(path, allow_pickle=allow_pickle)), "module.")
    found = detect_weight_format(sd)
    if found is None:
        raise CheckpointError(f"{path}: not the published weights of a registered backbone")
    sd = found[0].convert(sd)[0]
    backbone = backbone_of(model)
    expected = backbone.state_dict()
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing != allowed_missing or unexpected != allowed_unexpected:
        raise CheckpointError(
            f"{path}: leftover keys differ from the allowed ones: missing {first(sorted(missing))}, "
            f"unexpected {first(sorted(unexpected))}"
        )
    kept = {k: v for k, v in sd.items() if k in expected}
    result = backbone.load_state_dict(kept, strict=False)
    return {"source": str(path), "format": found[1], "target": "backbone", "num_tensors": len(kept),
            "missing": sorted(result.missing_keys), "dropped": sorted(unexpected), "iteration": None}


# ----------------------------------------------------------------------------------- model config


def infer_model_fields(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``ModelCfg`` fields from a segmentor state dict (``backbone.*`` + head keys) or bare backbone weights.

    The segmentor kind comes from the first ``SEGMENTORS`` entry that recognises the keys; the backbone
    fields from the first registered weight format that recognises the backbone part; the head fields from
    the segmentor entry. Returns {} when nothing is recognised.
    """
    from dida.models.registry import SEGMENTORS, weight_formats

    fields: dict[str, Any] = {}
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if backbone:
        for name, entry in SEGMENTORS.items():
            if entry.detect(sd):
                fields["segmentor"] = name
                fields.update(entry.infer_fields(sd))
                break
    else:
        backbone = dict(sd)
    for fmt in weight_formats():
        found = fmt.infer_fields(backbone)
        if found:
            return {**found, **fields}
    return fields if "segmentor" in fields else {}


def model_cfg_from_checkpoint(ckpt: Mapping[str, Any]) -> ModelCfg | None:
    """The ``ModelCfg`` a checkpoint was written for, or None when it cannot be told.

    dida checkpoints: the ``model`` section of their saved config (else inferred from the weights).
    mmcv / segmentor / backbone files: inferred from tensor shapes (``infer_model_fields``; backbone-only
    files give the default head).
    """
    from dida.config import ModelCfg

    names = {f.name for f in dataclasses.fields(ModelCfg)}
    try:
        fmt = detect_format(ckpt)
    except CheckpointError:
        return None
    if fmt == "dida":
        section = _saved_model_section(ckpt.get("config"))
        if section is not None:
            return _dataclass_from(ModelCfg, section)
        sd = ckpt.get("model")
    elif fmt == "mmcv":
        try:
            parts = split_mmcv_state_dict(unwrap(ckpt))
        except CheckpointError:
            return None
        sd = parts.get("model") or parts.get("ema_model") or parts.get("imnet_model")
    elif fmt == "segmentor":
        sd = strip_prefix(unwrap(ckpt), "module.")
    else:
        raw = strip_prefix(unwrap(ckpt), "module.")
        found = detect_weight_format(raw)
        sd = found[0].convert(raw)[0] if found is not None else None
    if not is_tensor_dict(sd):
        return None
    fields = infer_model_fields(sd)
    if not fields:
        return None
    return ModelCfg(**{k: v for k, v in fields.items() if k in names})


def _dataclass_from(cls: Any, data: Mapping[str, Any]) -> Any:
    """``cls(**data)`` without unknown keys, rebuilding nested dataclass sections (``model.hrda``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            continue
        factory = fields[key].default_factory
        if isinstance(value, Mapping) and factory is not dataclasses.MISSING:
            default = factory()
            if dataclasses.is_dataclass(default):
                value = _dataclass_from(type(default), value)
        kwargs[key] = value
    return cls(**kwargs)


def _saved_model_section(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str) or not text.strip():
        return None
    import yaml

    try:
        section = (yaml.safe_load(text) or {}).get("model")
    except (yaml.YAMLError, AttributeError):
        return None
    return dict(section) if isinstance(section, Mapping) else None
