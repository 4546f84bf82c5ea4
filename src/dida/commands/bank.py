"""``dida bank build CHECKPOINT --data ROOT --out DIR``: a class-balanced instance bank from a source model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from torch import nn

from dida.config import MAX_IMAGE_SIDE
from dida.data.kinds import DATASET_KINDS
from dida.errors import DataError
from dida.io import claim_output
from dida.runtime import resolve_device
from dida.uda.bank_builder import FEATURES_FILE, LABELS_FILE, build_bank, format_histogram

__all__ = ["bank_kinds", "main"]


def bank_kinds() -> list[str]:
    """Dataset kinds a bank can be built from: those with a source pipeline scale in ``DATASET_KINDS``."""
    return [name for name, kind in DATASET_KINDS.items() if kind.source_scale is not None]


def default_scale(model: Any, kind: str) -> tuple[int, int]:
    """The test scale of ``dida bank build`` without ``--img-scale``: the dataset kind's source-pipeline scale
    (``DATASET_KINDS``), divided by the model's context scale when it has one (HRDA: the HR pipeline's
    scale, e.g. 2560x1440 for GTA, so that the context branch, whose embedding the bank holds, sees the
    images at the DAFormer/DIDA scale the shipped banks were built at)."""
    scale = DATASET_KINDS[kind].source_scale
    assert scale is not None
    context = float(getattr(model, "context_scale", 1.0))
    return round(scale[0] / context), round(scale[1] / context)


def _load_model(args: Any) -> tuple[nn.Module, Any]:
    """The model of ``--config`` (or of the checkpoint's stored configuration) with the checkpoint's weights.

    Returns:
        (the model, the ``ResolvedConfig`` whose ``data.source`` gives the defaults of --dataset / --data /
        --img-scale).
    """
    from dida.checkpoint import load_checkpoint, read_checkpoint
    from dida.engine.checkpoint_config import config_for_checkpoint
    from dida.models import build_model

    ckpt = read_checkpoint(args.checkpoint, allow_pickle=bool(getattr(args, "allow_pickle", False)))
    resolved = config_for_checkpoint(ckpt, where=str(args.checkpoint), config=getattr(args, "config", None))
    model = build_model(resolved.cfg.model)
    load_checkpoint(model, ckpt, which=getattr(args, "which", "model"), source=str(args.checkpoint),
                    segmentor_only=True)
    return model, resolved


def _data_settings(args: Any, model: nn.Module, resolved: Any) -> tuple[str, str, tuple[int, int], str]:
    """(dataset kind, root, test scale, where they came from): the flags, else the run's source data."""
    source = resolved.cfg.data.source
    stored = not resolved.assumed  # the configuration came with the checkpoint (or --config)
    kind = args.dataset or (source.kind if stored and source.kind in bank_kinds() else "gta")
    root = args.data or (source.root if stored and kind == source.kind else None)
    if not root:
        raise DataError("--data: give the converted source dataset's root (the checkpoint's configuration does "
                        f"not name a {kind} dataset).")
    if args.img_scale:
        return kind, root, (int(args.img_scale[0]), int(args.img_scale[1])), "--img-scale"
    if stored and kind == source.kind:
        scale = (int(source.img_scale[0]), int(source.img_scale[1]))
        return kind, root, scale, f"the model's training scale (data.source.img_scale, {resolved.source})"
    return kind, root, default_scale(model, kind), f"the {kind} reference scale"


def _build_dataset(kind: str, root: str, num_classes: int) -> Any:
    """The training split of the source dataset at ``root`` (``dida.data.build_dataset``)."""
    from dida.config import DatasetCfg
    from dida.data import build_dataset

    if kind not in bank_kinds():
        raise DataError(f"unknown dataset kind {kind!r}; use {', '.join(bank_kinds())}.")
    return build_dataset(DatasetCfg(kind=kind, root=root, split="train"), num_classes)


def main(args: argparse.Namespace) -> int:
    """``dida bank build CHECKPOINT --data ROOT --out DIR``: write ``f_buffer_s.npz`` / ``l_buffer_s.npz``."""
    if args.size < 1:
        raise DataError(f"--size must be >= 1, got {args.size}.")
    if args.max_images is not None and args.max_images < 1:
        raise DataError(f"--max-images must be >= 1, got {args.max_images}.")
    if args.img_scale and (min(args.img_scale) < 1 or max(args.img_scale) > MAX_IMAGE_SIDE):
        raise DataError(f"--img-scale needs two sizes in [1, {MAX_IMAGE_SIDE}], got {list(args.img_scale)}.")
    device = resolve_device(getattr(args, "device", "auto"))
    out = claim_output(args.out, kind="dir", files=[FEATURES_FILE, LABELS_FILE], option="--out",
                       force=bool(getattr(args, "force", False)))
    model, resolved = _load_model(args)
    num_classes = int(model.num_classes)
    kind, root, img_scale, why = _data_settings(args, model, resolved)
    dataset = _build_dataset(kind, root, num_classes)
    print(f"bank from {len(dataset)} {kind} images in {root} at {img_scale[0]}x{img_scale[1]} ({why})",
          file=sys.stderr)
    bank = build_bank(
        model,
        dataset,
        args.size,
        num_classes,
        device=device,
        seed=getattr(args, "seed", 0),
        max_images=getattr(args, "max_images", None),
        img_scale=img_scale,
        amp=getattr(args, "amp", "off"),
    )
    bank.save_npz(out / FEATURES_FILE, out / LABELS_FILE)
    print(f"wrote {out / FEATURES_FILE} ({bank.num_entries} x {bank.dim} float32) and {out / LABELS_FILE}")
    print("entries per class:")
    print(format_histogram(bank, num_classes))
    return 0
