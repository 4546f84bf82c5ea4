"""``dida convert-checkpoint INPUT OUTPUT``: an mmcv DAFormer / DIDA checkpoint -> a dida checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dida.checkpoint import (
    detect_format,
    load_state_dict_strict,
    model_cfg_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
    split_mmcv_state_dict,
    unwrap,
)
from dida.checkpoint.io import plain
from dida.errors import CheckpointError
from dida.io import claim_output
from dida.models import build_model

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """``dida convert-checkpoint INPUT OUTPUT``: mmcv DIDA/DAFormer checkpoint -> dida checkpoint.

    Keeps the student (``model``) and the EMA teacher (``ema_model``); the frozen ImageNet copy
    (``imnet_model``) and the optimizer state are dropped (training rebuilds them). Both kept models are
    verified by a strict load into the inferred architecture before anything is written.
    """
    src = Path(args.input)
    claim_output(args.output, inputs=[src], force=bool(getattr(args, "force", False)), option="OUTPUT")
    obj = read_checkpoint(src, allow_pickle=bool(getattr(args, "allow_pickle", False)))
    fmt = detect_format(obj)
    if fmt != "mmcv":
        hint = {
            "dida": "it is already a dida checkpoint",
            "mit": "it is an ImageNet backbone: use it as model.pretrained",
            "hf": "it is a Hugging Face encoder: use it as model.pretrained",
            "segmentor": "it is a bare segmentor state dict: load it with load_checkpoint",
        }.get(fmt, f"it holds {fmt} backbone weights: use them as model.pretrained")
        raise CheckpointError(f"{src}: not an mmcv DIDA/DAFormer checkpoint ({hint}).")
    parts = split_mmcv_state_dict(unwrap(obj))
    if "model" not in parts:
        raise CheckpointError(f"{src}: has no model.* (student) weights; has {', '.join(parts)}")
    cfg = model_cfg_from_checkpoint(obj)
    if cfg is None:
        raise CheckpointError(f"{src}: cannot tell the architecture from the weights")
    model = build_model(cfg)
    for name in ("model", "ema_model"):
        if name in parts:
            load_state_dict_strict(model, parts[name], str(src), f"{name} weights")
    meta = plain(obj.get("meta") or {})
    iteration = meta.get("iter") if isinstance(meta.get("iter"), int) else 0
    out = {
        "model": parts["model"],
        "ema_model": parts.get("ema_model"),
        "optimizer": None,
        "scheduler": None,
        "iteration": iteration,
        "config": None,
        "rng": None,
        "terms": {},
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
