"""Reading, converting, strictly loading and writing checkpoints (spec 1.2(a), 1.4).

Supported inputs, detected automatically:

- ``"mit"``: official SegFormer ImageNet MiT files (``mit_b5.pth``): raw, or wrapped in ``state_dict`` /
  ``model``; the ImageNet classifier ``head.*`` is dropped.
- ``"hf"``: Hugging Face ``transformers`` SegFormer encoders (``.safetensors`` or ``.bin``), with or
  without the ``segformer.`` prefix, in the hub layout (``encoder.block.0.0.attention.self.query``) or
  the transformers >= 5 module layout (``stages.0.blocks.0.attention.q_proj``). Separate key/value
  projections are concatenated into ``attn.kv``; ``classifier.*`` / ``decode_head.*`` are dropped.
- ``"mmcv"``: DAFormer / DIDA training checkpoints (``state_dict`` with ``model.`` / ``ema_model.`` /
  ``imnet_model.`` prefixes, ``meta``, ``optimizer``); ``which`` picks the sub-model.
- ``"segmentor"``: a bare segmentor state dict (``backbone.*``, ``decode_head.*``).
- ``"dida"``: this project's own format (see ``save_checkpoint``).

Files are opened with ``torch.load(weights_only=True)``: a file that needs arbitrary Python objects is
refused unless the user passes ``--allow-pickle``. Loading is strict: missing, unexpected or
wrongly-shaped tensors raise ``CheckpointError`` naming the first offenders.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dida.errors import CheckpointError
from dida.io import atomic_torch_save

if TYPE_CHECKING:
    from dida.config import ModelCfg

log = logging.getLogger(__name__)

FORMAT_NAME = "dida"
FORMAT_VERSION = 1
MMCV_PREFIXES = ("model.", "ema_model.", "imnet_model.")
_SHOW = 5  # offending keys listed in error messages

StateDict = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------------- reading


def _describe(source: str | os.PathLike[str] | None) -> str:
    return str(source) if source is not None else "<in-memory checkpoint>"


def read_checkpoint(path: str | os.PathLike[str], allow_pickle: bool = False) -> dict[str, Any]:
    """Load a checkpoint file into a dict on the CPU, safely.

    ``.safetensors`` files go through ``safetensors.torch.load_file``; everything else through
    ``torch.load(weights_only=not allow_pickle)``.

    Raises:
        CheckpointError: missing file; a file that needs arbitrary Python objects (names the object and
            the ``--allow-pickle`` flag); a truncated or non-checkpoint file; a file holding no dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (no such file). Check the path.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own SafetensorError / OSError types
            raise CheckpointError(
                f"{path}: cannot read the safetensors file ({e}); it is truncated or not a checkpoint. "
                "Download or copy it again."
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", msg)
        if not allow_pickle and found is not None:
            raise CheckpointError(
                f"{path}: refusing to unpickle the Python object {found.group(1)!r}: loading it could run "
                "arbitrary code. If you trust the file's source, re-run with --allow-pickle "
                "(allow_pickle=True)."
            ) from None
        detail = [line for line in msg.splitlines() if line.strip()]
        reason = detail[-2].strip()[:120] if len(detail) >= 2 else msg[:120]
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint (cannot be unpickled: {reason}). "
            "Download or copy it again."
        ) from None
    except (EOFError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint ({type(e).__name__}: {str(e)[:120]}). "
            "Download or copy it again."
        ) from None
    except RuntimeError as e:
        text = str(e)
        if "zip archive" in text or "PytorchStreamReader" in text or "corrupt" in text.lower():
            raise CheckpointError(
                f"{path}: truncated or not a checkpoint (the zip container is damaged: "
                f"{text.split('. ')[0][:120]}). "
                "Download or copy it again."
            ) from None
        raise CheckpointError(f"{path}: cannot load the checkpoint: {text[:300]}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; not a checkpoint dida can read."
        )
    return dict(obj)


# ----------------------------------------------------------------------------------- key mappings


def strip_prefix(sd: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove ``prefix`` from the keys that start with it (other keys unchanged); returns a new dict."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The tensor dict inside ``{'state_dict': ...}`` / ``{'model': ...}`` or ``obj`` itself."""
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if _is_tensor_dict(inner):
            return dict(inner)
    return dict(obj)


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
    sd = strip_prefix(_unwrap(sd), "module.")
    if _hf_layout(sd) is not None:
        return hf_to_mit_state_dict(sd)[0]
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


# ---------------------------------------------------------------------------------- format detection


def detect_format(obj: Mapping[str, Any]) -> str:
    """One of ``"dida"``, ``"mmcv"``, ``"segmentor"``, ``"mit"``, ``"hf"``.

    Raises:
        CheckpointError: when none applies.
    """
    if obj.get("format") == FORMAT_NAME:
        return "dida"
    sd = strip_prefix(_unwrap(obj), "module.")
    keys = list(sd)
    if any(k.startswith(MMCV_PREFIXES) and ".backbone." in k for k in keys):
        return "mmcv"
    if any(k.startswith("backbone.") for k in keys):
        return "segmentor"
    if any(k.startswith("patch_embed1.") for k in keys):
        return "mit"
    if _hf_layout(sd) is not None:
        return "hf"
    raise CheckpointError(
        "not a MiT / SegFormer / DAFormer / DIDA checkpoint; its first keys are "
        f"{_first(keys)}"
    )


def _first(items: Iterable[Any], n: int = _SHOW) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return f"{shown}{f' ... (+{len(items) - n} more)' if len(items) > n else ''}"


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
        raise CheckpointError(f"unexpected keys outside model./ema_model./imnet_model.: {_first(rest)}")
    return parts


# --------------------------------------------------------------------------------- strict loading


def _class_count_problem(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    key = "decode_head.conv_seg.weight" if "decode_head.conv_seg.weight" in expected else "conv_seg.weight"
    if key in sd and key in expected and sd[key].ndim == 4 and sd[key].shape[1:] == expected[key].shape[1:]:
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
            parts.append(f"{len(mismatched)} shape mismatches ({_first(mismatched, 3)})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if not_tensor:
            parts.append(f"non-tensor values ({_first(not_tensor)})")
        guess = _guess_architecture(sd)
        hint = f" The checkpoint looks like {guess}." if guess else ""
        raise CheckpointError(
            f"{source}: cannot load {what}: {'; '.join(parts)}.{hint} Build the model with the "
            "checkpoint's architecture and class count (e.g. the model.* config keys), or pick the "
            "right checkpoint."
        )
    full = dict(sd)
    for k in expected:
        if k not in full:
            full[k] = expected[k]  # a tolerated num_batches_tracked
    module.load_state_dict(full, strict=True)
    return len(sd)


def _guess_architecture(sd: Mapping[str, torch.Tensor]) -> str:
    try:
        cfg = _infer_model_fields(sd)
    except Exception:  # a guess for an error message must never mask the real error
        return ""
    if not cfg:
        return ""
    if cfg.get("embed_dims") is not None:
        desc = f"a custom MiT with embed_dims {cfg['embed_dims']} and depths {cfg['depths']}"
    else:
        desc = cfg["backbone"]
    if "num_classes" in cfg:
        desc += f", {cfg['num_classes']} classes"
    return desc


def _backbone_of(model: nn.Module) -> nn.Module:
    from dida.models import MixVisionTransformer, Segmentor

    if isinstance(model, Segmentor):
        return model.backbone
    if isinstance(model, MixVisionTransformer):
        return model
    raise TypeError(f"expected a Segmentor or MixVisionTransformer, got {type(model).__name__}")


def load_checkpoint(
    model: nn.Module,
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    which: str = "model",
    *,
    allow_pickle: bool = False,
    source: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Load any supported checkpoint into a ``Segmentor`` (or a bare ``MixVisionTransformer``), strictly.

    Args:
        model: the segmentor, or a bare backbone (then only the backbone part of the file is used).
        path_or_dict: a file, or an already-read checkpoint dict.
        which: the sub-model of an mmcv (``model``/``ema_model``/``imnet_model``) or dida
            (``model``/``ema_model``) checkpoint; ignored for single-model files.
        allow_pickle: trust the file (unsafe unpickling).
        source: the file an already-read dict came from, named in error messages.

    Returns:
        info dict: ``source``, ``format``, ``which``, ``target`` (``"segmentor"`` or ``"backbone"``),
        ``num_tensors`` loaded, ``dropped`` (keys deliberately left out), ``iteration`` (if known).

    Raises:
        CheckpointError: unreadable file, unknown layout, missing sub-model, or any key/shape mismatch.
    """
    from dida.models import Segmentor

    if isinstance(path_or_dict, Mapping):
        obj, source = dict(path_or_dict), _describe(source)
    else:
        obj, source = read_checkpoint(path_or_dict, allow_pickle=allow_pickle), _describe(path_or_dict)
    try:
        fmt = detect_format(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    is_segmentor = isinstance(model, Segmentor)
    info: dict[str, Any] = {"source": source, "format": fmt, "which": which, "dropped": [], "iteration": None}

    if fmt in ("mit", "hf"):
        sd = strip_prefix(_unwrap(obj), "module.")
        if fmt == "hf":
            try:
                sd, dropped = hf_to_mit_state_dict(sd)
            except CheckpointError as e:
                raise CheckpointError(f"{source}: {e}") from None
        else:
            dropped = [k for k in sd if k.startswith("head.")]
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        info["dropped"] = dropped
        info["target"] = "backbone"
        info["num_tensors"] = load_state_dict_strict(_backbone_of(model), sd, source, f"the {fmt} backbone")
        log.info("loaded %d backbone tensors from %s (%s; dropped %d)", info["num_tensors"], source, fmt,
                 len(dropped))
        return info

    if fmt == "dida":
        if which not in ("model", "ema_model"):
            raise CheckpointError(f"{source}: a dida checkpoint holds 'model' and 'ema_model', not {which!r}")
        sd = obj.get(which)
        if not _is_tensor_dict(sd):
            raise CheckpointError(f"{source}: this dida checkpoint has no {which!r} weights")
        info["iteration"] = obj.get("iteration")
    elif fmt == "mmcv":
        if which not in ("model", "ema_model", "imnet_model"):
            raise CheckpointError(
                f"{source}: an mmcv UDA checkpoint holds model / ema_model / imnet_model, not {which!r}"
            )
        try:
            parts = split_mmcv_state_dict(_unwrap(obj))
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if which not in parts:
            raise CheckpointError(
                f"{source}: no {which}.* weights in this checkpoint (has {', '.join(parts)})"
            )
        sd = parts[which]
        info["dropped"] = [f"{name}.* ({len(p)} tensors)" for name, p in parts.items() if name != which]
        meta = obj.get("meta")
        if isinstance(meta, Mapping) and isinstance(meta.get("iter"), int):
            info["iteration"] = meta["iter"]
    else:  # segmentor
        sd = strip_prefix(_unwrap(obj), "module.")

    if is_segmentor:
        info["target"] = "segmentor"
        info["num_tensors"] = load_state_dict_strict(model, sd, source, f"{which} weights ({fmt})")
    else:
        backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        rest = [k for k in sd if not k.startswith("backbone.")]
        bad = [k for k in rest if not k.startswith("decode_head.")]
        if bad:
            raise CheckpointError(f"{source}: unexpected keys {_first(bad)}")
        info["dropped"] = info["dropped"] + ([f"decode_head.* ({len(rest)} tensors)"] if rest else [])
        info["target"] = "backbone"
        info["num_tensors"] = load_state_dict_strict(
            _backbone_of(model), backbone, source, f"the {which} backbone ({fmt})"
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
    """Load ImageNet MiT weights (official or HF file) into ``model``'s backbone.

    Strict by default; otherwise the missing / unexpected sets must equal the allowed ones exactly
    (keys named in MiT terms, classifier already dropped).
    """
    allowed_missing, allowed_unexpected = set(allowed_missing), set(allowed_unexpected)
    if not allowed_missing and not allowed_unexpected:
        info = load_checkpoint(model, path, allow_pickle=allow_pickle)
        if info["format"] not in ("mit", "hf"):
            log.info("%s is a %s checkpoint, not an ImageNet backbone; loaded it as such",
                     path, info["format"])
        return info
    sd = convert_mit_state_dict(read_checkpoint(path, allow_pickle=allow_pickle))
    backbone = _backbone_of(model)
    expected = backbone.state_dict()
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing != allowed_missing or unexpected != allowed_unexpected:
        raise CheckpointError(
            f"{path}: leftover keys differ from the allowed ones: missing {_first(sorted(missing))}, "
            f"unexpected {_first(sorted(unexpected))}"
        )
    kept = {k: v for k, v in sd.items() if k in expected}
    result = backbone.load_state_dict(kept, strict=False)
    return {"source": str(path), "format": "mit", "target": "backbone", "num_tensors": len(kept),
            "missing": sorted(result.missing_keys), "dropped": sorted(unexpected), "iteration": None}


# ----------------------------------------------------------------------------------- model config


def _infer_model_fields(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ModelCfg fields from segmentor (``backbone.*``/``decode_head.*``) or bare MiT weights.

    Head counts and ASPP dilations are not stored in weights: a standard variant's heads are used
    (otherwise ``max(1, dim // 64)``), and the reference dilations for 4 ASPP branches.
    """
    from dida.models.mit import MIT_VARIANTS

    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")} or dict(sd)
    if "patch_embed1.proj.weight" not in bb:
        return {}
    dims = [int(bb[f"patch_embed{s}.proj.weight"].shape[0]) for s in range(1, 5)]
    depths = []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in bb if (m := re.match(rf"^block{s}\.(\d+)\.", k))}
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
    if "decode_head.conv_seg.weight" in sd:
        w = sd["decode_head.conv_seg.weight"]
        fields["num_classes"] = int(w.shape[0])
        fields["decoder_channels"] = int(w.shape[1])
        aspp = re.compile(r"^decode_head\.fuse_layer\.aspp_modules\.(\d+)\.")
        branches = {int(m.group(1)) for k in sd if (m := aspp.match(k))}
        if len(branches) != 4:
            fields["aspp_dilations"] = [1] + [6 * j for j in range(1, len(branches))]
    return fields


def model_cfg_from_checkpoint(ckpt: Mapping[str, Any]) -> ModelCfg | None:
    """The ``ModelCfg`` a checkpoint was written for, or None when it cannot be told.

    dida checkpoints: the ``model`` section of their saved config (else inferred from the weights).
    mmcv / segmentor / MiT / HF: inferred from tensor shapes (variant from dims and depths, classes from
    ``conv_seg``; backbone-only files give the default head).
    """
    from dida.config import ModelCfg

    names = {f.name for f in dataclasses.fields(ModelCfg)}
    try:
        fmt = detect_format(ckpt)
    except CheckpointError:
        return None
    if fmt == "dida":
        text = ckpt.get("config")
        if isinstance(text, str) and text.strip():
            import yaml

            try:
                section = (yaml.safe_load(text) or {}).get("model")
            except yaml.YAMLError:
                section = None
            if isinstance(section, Mapping):
                return ModelCfg(**{k: v for k, v in section.items() if k in names})
        sd = ckpt.get("model")
    elif fmt == "mmcv":
        try:
            parts = split_mmcv_state_dict(_unwrap(ckpt))
        except CheckpointError:
            return None
        sd = parts.get("model") or parts.get("ema_model") or parts.get("imnet_model")
    else:
        sd = convert_mit_state_dict(ckpt) if fmt in ("mit", "hf") else strip_prefix(_unwrap(ckpt), "module.")
    if not _is_tensor_dict(sd):
        return None
    fields = _infer_model_fields(sd)
    if not fields:
        return None
    return ModelCfg(**{k: v for k, v in fields.items() if k in names})


# ----------------------------------------------------------------------------------------- writing

_PLAIN = (
    str, bytes, int, float, bool, complex, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device
)


def _unsafe_values(obj: Any, where: str = "", out: list[str] | None = None) -> list[str]:
    """Paths of values that ``torch.load(weights_only=True)`` would refuse (numpy arrays, objects)."""
    out = [] if out is None else out
    if isinstance(obj, Mapping):
        if type(obj) not in (dict, OrderedDict):
            out.append(f"{where or '<root>'} ({type(obj).__name__})")
        for k, v in obj.items():
            _unsafe_values(v, f"{where}.{k}" if where else str(k), out)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        if type(obj) not in (list, tuple, set, frozenset, torch.Size):
            out.append(f"{where} ({type(obj).__name__})")
        for i, v in enumerate(obj):
            _unsafe_values(v, f"{where}[{i}]", out)
    elif not isinstance(obj, _PLAIN) or (type(obj) not in _PLAIN and not isinstance(obj, torch.Tensor)):
        out.append(f"{where} ({type(obj).__module__}.{type(obj).__name__})")
    return out


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write a dida checkpoint atomically (temporary file + rename).

    ``state`` follows the dida format: ``model``, ``ema_model``, ``optimizer``, ``scheduler``,
    ``iteration``, ``config`` (YAML text), ``rng``, ``instance_bank``, ``meta``; ``format`` and
    ``version`` are filled in. Only plain types and tensors are allowed, so that the file loads with
    ``weights_only=True``.

    Raises:
        CheckpointError: values that a safe load would refuse (numpy arrays/scalars, arbitrary objects).
    """
    full = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **state}
    bad = _unsafe_values(full)
    if bad:
        raise CheckpointError(
            f"{path}: not writing a checkpoint holding values a safe load would refuse: {_first(bad)}. "
            "Convert them to tensors or plain Python types."
        )
    atomic_torch_save(full, path)


def _plain(obj: Any) -> Any:
    """Meta values as plain Python (tuples -> lists; anything exotic -> its ``repr``)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool, type(None))):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return repr(obj)


def main_convert_checkpoint(args: Any) -> int:
    """``dida convert-checkpoint INPUT OUTPUT``: mmcv DIDA/DAFormer checkpoint -> dida checkpoint.

    Keeps the student (``model``) and the EMA teacher (``ema_model``); the frozen ImageNet copy
    (``imnet_model``) and the optimizer state are dropped (training rebuilds them). Both kept models are
    verified by a strict load into the inferred architecture before anything is written.
    """
    from dida.models import build_segmentor_from_cfg

    src = Path(args.input)
    obj = read_checkpoint(src, allow_pickle=bool(getattr(args, "allow_pickle", False)))
    fmt = detect_format(obj)
    if fmt != "mmcv":
        hint = {
            "dida": "it is already a dida checkpoint",
            "mit": "it is an ImageNet backbone: use it as model.pretrained",
            "hf": "it is a Hugging Face encoder: use it as model.pretrained",
            "segmentor": "it is a bare segmentor state dict: load it with load_checkpoint",
        }[fmt]
        raise CheckpointError(f"{src}: not an mmcv DIDA/DAFormer checkpoint ({hint}).")
    parts = split_mmcv_state_dict(_unwrap(obj))
    if "model" not in parts:
        raise CheckpointError(f"{src}: has no model.* (student) weights; has {', '.join(parts)}")
    cfg = model_cfg_from_checkpoint(obj)
    if cfg is None:
        raise CheckpointError(f"{src}: cannot tell the architecture from the weights")
    model = build_segmentor_from_cfg(cfg)
    for name in ("model", "ema_model"):
        if name in parts:
            load_state_dict_strict(model, parts[name], str(src), f"{name} weights")
    meta = _plain(obj.get("meta") or {})
    iteration = meta.get("iter") if isinstance(meta.get("iter"), int) else 0
    out = {
        "model": parts["model"],
        "ema_model": parts.get("ema_model"),
        "optimizer": None,
        "scheduler": None,
        "iteration": iteration,
        "config": None,
        "rng": None,
        "instance_bank": None,
        "meta": {
            "source": str(src),
            "source_format": "mmcv",
            "model_cfg": dataclasses.asdict(cfg),
            "mmcv_meta": meta,
        },
    }
    save_checkpoint(args.output, out)
    print(f"converted {src} (mmcv) -> {args.output} (dida)")
    print(f"  architecture: {cfg.backbone}, {cfg.num_classes} classes, "
          f"decoder channels {cfg.decoder_channels}"
          + (f", embed_dims {cfg.embed_dims}, depths {cfg.depths}" if cfg.embed_dims else ""))
    for name, p in parts.items():
        status = "kept" if name in ("model", "ema_model") else "dropped (rebuilt from ImageNet weights)"
        print(f"  {name}: {len(p)} tensors, {status}")
    if obj.get("optimizer") is not None:
        print("  optimizer: dropped (per-parameter mmcv groups; a resumed run starts a fresh optimizer)")
    print(f"  iteration: {iteration}")
    return 0
