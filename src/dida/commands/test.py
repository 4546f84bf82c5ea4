"""``dida test CONFIG_OR_RUN_DIR CHECKPOINT``: mIoU table, ``metrics.json``, ``iou.png`` and predictions."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dida.constants import class_names
from dida.data.kinds import DATASET_KINDS
from dida.errors import CheckpointError, ConfigError, DataError
from dida.hub import is_export_folder, is_hub_ref, local_output_dir, resolve, resolve_config
from dida.io import claim_output
from dida.runtime import inference_precision, resolve_device

__all__ = ["main", "metrics_to_json"]


def _json_value(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return [_json_value(v) for v in x.tolist()]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def metrics_to_json(metrics: dict[str, Any], num_classes: int, synthia: bool) -> dict[str, Any]:
    """JSON-ready summary (fractions in [0, 1]; NaN -> null)."""
    names = class_names(num_classes)
    out: dict[str, Any] = {
        "aAcc": _json_value(metrics["aAcc"]),
        "mIoU": _json_value(metrics["mIoU"]),
        "mAcc": _json_value(metrics["mAcc"]),
    }
    if synthia:
        out["mIoU16"] = _json_value(metrics["mIoU16"])
        out["mIoU13"] = _json_value(metrics["mIoU13"])
    out["per_class"] = {
        name: {"IoU": _json_value(metrics["IoU"][i]), "Acc": _json_value(metrics["Acc"][i])}
        for i, name in enumerate(names)
    }
    for key in ("num_images", "num_pixels", "seconds", "images_per_s"):
        if key in metrics:
            out[key] = _json_value(metrics[key])
    return out


def _image_root(dataset: Any) -> Path | None:
    """The folder the images of a dataset live under (for mirroring sub-folders in outputs)."""
    for attr in ("img_dir", "image_dir", "img_root"):
        value = getattr(dataset, attr, None)
        if value:
            return Path(value)
    samples = getattr(dataset, "samples", None)
    if samples:
        return Path(os.path.commonpath([str(Path(s[0]).parent) for s in samples]))
    return None


def _check_class_count(ckpt_path: str, ckpt: dict[str, Any], cfg_classes: int, kind: str) -> None:
    """The checkpoint, the config and the dataset kind (``DATASET_KINDS``) must agree on the classes."""
    from dida.checkpoint import model_cfg_from_checkpoint

    model_cfg = model_cfg_from_checkpoint(ckpt)
    if model_cfg is not None and model_cfg.num_classes != cfg_classes:
        raise CheckpointError(
            f"{ckpt_path}: the checkpoint predicts {model_cfg.num_classes} classes but the config says "
            f"model.num_classes={cfg_classes}. Use the config the checkpoint was trained with "
            f"(its run directory) or override model.num_classes={model_cfg.num_classes}."
        )
    expected = DATASET_KINDS[kind].num_classes if kind in DATASET_KINDS else None
    if expected is not None and cfg_classes != expected:
        raise ConfigError(
            f"{ckpt_path}: a {cfg_classes}-class model cannot be evaluated on the {kind} dataset, which "
            f"has {expected} train ids. Use a {expected}-class checkpoint or a 'folder' dataset."
        )


def _load_config(args: argparse.Namespace) -> Any:
    """The configuration with the command-line options (``--data-root``, ``--mode``) applied."""
    from dida.config import load_config, validate

    cfg = load_config(resolve_config(args.config), list(args.overrides or ()))
    if args.data_root:
        cfg.data.val.root = args.data_root
    if args.mode:
        cfg.eval.mode = args.mode
        validate(cfg)  # e.g. slide windows vs the stride
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}.")
    return cfg


def _checkpoint_ref(args: argparse.Namespace) -> str:
    """CHECKPOINT; when omitted, CONFIG's own weights (an exported folder, an hf:// export, a run's latest.pth).

    With CHECKPOINT omitted argparse takes the first override for it: it is moved back to the overrides.
    """
    ckpt = args.checkpoint
    if ckpt is not None and "=" in ckpt and not is_hub_ref(ckpt) and not Path(ckpt).exists():
        args.overrides, ckpt = [ckpt, *(args.overrides or ())], None
    if ckpt is None:
        if is_hub_ref(args.config) or is_export_folder(args.config):
            return str(args.config)
        if (Path(args.config) / "latest.pth").is_file():
            return str(Path(args.config) / "latest.pth")
        raise ConfigError(
            f"dida test {args.config}: give the CHECKPOINT to evaluate (only an exported model folder, an "
            "hf:// export or a run directory with latest.pth carries its own)."
        )
    return ckpt


def _load_dataset(cfg: Any) -> Any:
    """The validation dataset of ``cfg``; an empty split is an error."""
    from dida.data import build_dataset

    dataset = build_dataset(cfg.data.val, cfg.model.num_classes)
    if len(dataset) == 0:
        raise DataError(
            f"{cfg.data.val.root}: the '{cfg.data.val.split}' split of this {cfg.data.val.kind} dataset "
            "has no images. Check data.val.root / data.val.split (or --data-root)."
        )
    return dataset


def _write_outputs(args: argparse.Namespace, cfg: Any, metrics: dict[str, Any], out_dir: Path,
                   ckpt_path: str, device: Any) -> list[Path]:
    """Print the table and write ``metrics.json``, ``config.yaml`` and ``iou.png``; returns what was written."""
    from dida.config import to_yaml
    from dida.engine.report import format_metrics_table, plot_class_iou
    from dida.io import atomic_open

    synthia = cfg.data.source.kind == "synthia"
    names = class_names(cfg.model.num_classes)
    print(format_metrics_table(metrics, names, synthia=synthia))
    summary = metrics_to_json(metrics, cfg.model.num_classes, synthia)
    summary.update(
        checkpoint=str(Path(ckpt_path).resolve()), which=args.which, mode=cfg.eval.mode,
        hrda_out=getattr(args, "hrda_out", None),
        dataset={"kind": cfg.data.val.kind, "root": cfg.data.val.root, "split": cfg.data.val.split,
                 "img_scale": list(cfg.data.val.img_scale)},
        device=str(device), amp=args.amp,
    )
    with atomic_open(out_dir / "metrics.json", "w") as f:
        json.dump(summary, f, indent=2)
    with atomic_open(out_dir / "config.yaml", "w") as f:
        f.write(to_yaml(cfg))
    written = [out_dir / "metrics.json"]
    try:
        plot_class_iou(metrics["IoU"], names, out_dir / "iou.png",
                       title=f"{Path(ckpt_path).name} ({args.which}), {metrics['num_images']} "
                             f"{cfg.data.val.kind} {cfg.data.val.split} images")
        written.append(out_dir / "iou.png")
    except ImportError:
        print("matplotlib is not installed (pip install 'dida[viz]'): iou.png skipped.", file=sys.stderr)
    return written


def _write_attention(args: argparse.Namespace, cfg: Any, model: Any, val: Any, dataset: Any, out_dir: Path,
                     device: Any, amp: str) -> int:
    """``--hrda-out att``: the attention map of every val image as an 8-bit PNG (x255); no metrics."""
    import torch

    from dida.engine.evaluate import _prediction_stem
    from dida.engine.hrda_outputs import attention_image
    from dida.io import write_png
    from dida.runtime import autocast

    img_root, suffix = _image_root(dataset), str(getattr(dataset, "img_suffix", ""))
    total = len(val) if args.limit is None else min(len(val), args.limit)
    model.eval()
    for i in range(total):
        item = val[i]
        with torch.no_grad(), autocast(device, amp):
            img = item["img"][None].to(device, next(model.parameters()).dtype)
            att = attention_image(model, img, out_size=item["ori_shape"],
                                  mode=cfg.eval.mode, crop_size=cfg.eval.crop_size, stride=cfg.eval.stride,
                                  batched_slide=cfg.eval.batched_slide)
        stem = _prediction_stem(str(item["filename"]), img_root, suffix)
        write_png(out_dir / "attention" / stem.parent / f"{stem.name}_attention.png", att)
    print(f"wrote the HRDA attention maps (x255) of {total} image(s) to {out_dir / 'attention'}")
    return 0


def main(args: argparse.Namespace) -> int:
    """``dida test CONFIG_OR_RUN_DIR CHECKPOINT``: mIoU table, ``metrics.json`` and ``iou.png``."""
    from dida.checkpoint import load_checkpoint, read_checkpoint
    from dida.data.uda import ValDataset
    from dida.engine.evaluate import PredictionWriter, evaluate
    from dida.engine.hrda_outputs import align_input, hrda_branch
    from dida.models import build_model

    ckpt_ref = _checkpoint_ref(args)
    cfg = _load_config(args)
    device = resolve_device(args.device)

    ckpt_path = str(resolve(ckpt_ref, which=args.which))  # hf:// -> the Hub cache
    if not Path(ckpt_path).exists():
        raise CheckpointError(f"{ckpt_path}: no such checkpoint file or exported model folder.")
    hrda_out = getattr(args, "hrda_out", None)
    out_dir = Path(args.out) if args.out else local_output_dir(ckpt_ref, Path(ckpt_path)) / "test"
    outputs = ["attention"] if hrda_out == "att" else ["metrics.json", "config.yaml", "iou.png"] + (
        ["preds"] if args.save_preds else [])
    ckpt = read_checkpoint(ckpt_path, allow_pickle=args.allow_pickle)
    _check_class_count(ckpt_path, ckpt, cfg.model.num_classes, cfg.data.val.kind)

    dataset = _load_dataset(cfg)
    val = ValDataset(dataset, img_scale=tuple(cfg.data.val.img_scale))
    claim_output(out_dir, kind="dir", files=outputs, force=bool(getattr(args, "force", False)), option="--out")

    model = build_model(cfg.model)
    load_checkpoint(model, ckpt, which=args.which, allow_pickle=args.allow_pickle, source=ckpt_path,
                    segmentor_only=True)
    if hrda_out:
        model = hrda_branch(model, hrda_out, source=f"{ckpt_path} ({args.config})")
    # bf16: the weights themselves are cast (no autocast); metrics.json still records the requested setting
    model, amp = inference_precision(align_input(model).to(device), args.amp)

    if hrda_out == "att":
        return _write_attention(args, cfg, model, val, dataset, out_dir, device, amp)
    writer = None
    if args.save_preds:
        formats = ("color", "trainid", "cityscapes") if args.format == "all" else (args.format,)
        writer = PredictionWriter(out_dir / "preds", formats, _image_root(dataset),
                                  str(getattr(dataset, "img_suffix", "")), cfg.model.num_classes)
    workers = min(cfg.data.num_workers, len(val))
    try:
        metrics = evaluate(
            model, val, device=device, mode=cfg.eval.mode, crop_size=cfg.eval.crop_size,
            stride=cfg.eval.stride, batched_slide=cfg.eval.batched_slide, amp=amp,
            num_classes=cfg.model.num_classes,
            max_images=args.limit, on_prediction=writer, num_workers=workers,
        )
    finally:
        if writer is not None:
            writer.close()

    written = _write_outputs(args, cfg, metrics, out_dir, ckpt_path, device)
    if writer is not None:
        written.append(out_dir / "preds")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
