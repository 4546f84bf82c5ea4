"""Inference on your own images (``dida infer``): label maps and palette overlays (spec 10).

For every image: OpenCV decode (BGR) -> test pipeline (keep-ratio resize to ``img_scale``, normalise)
-> whole inference -> logits resized to the input size, then to the original size -> softmax ->
argmax. Writes ``<stem>_pred.png`` (``uint8(img_BGR * (1 - opacity) + colour_BGR * opacity)``, the
mmseg ``show_result`` blend) and ``<stem>_labelTrainIds.png`` (raw train ids).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dida.constants import IGNORE_INDEX, PALETTE
from dida.errors import CheckpointError, ConfigError, DataError, DidaError

if TYPE_CHECKING:
    import argparse

    from torch import nn

__all__ = [
    "IMAGE_SUFFIXES", "colorize", "list_images", "main_infer", "overlay", "palette_lut", "predict_image",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_OUTPUT_SUFFIXES = ("_pred.png", "_labelTrainIds.png")


def palette_lut(num_classes: int = len(PALETTE)) -> np.ndarray:
    """``[256, 3]`` uint8 RGB colour table: the Cityscapes palette for the first 19 ids, fixed pseudo-random
    colours for any further class, black for ``IGNORE_INDEX`` and unused ids."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: min(num_classes, len(PALETTE))] = np.asarray(PALETTE[:num_classes], dtype=np.uint8)
    if num_classes > len(PALETTE):
        extra = np.random.default_rng(0).integers(0, 256, size=(num_classes - len(PALETTE), 3))
        lut[len(PALETTE) : num_classes] = extra.astype(np.uint8)
    lut[IGNORE_INDEX] = 0
    return lut


def colorize(label: np.ndarray | torch.Tensor, num_classes: int = len(PALETTE)) -> np.ndarray:
    """Train-id map ``[H, W]`` -> RGB ``[H, W, 3]`` uint8 (palette colours; 255 -> black)."""
    label_np = label.cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return palette_lut(num_classes)[label_np.astype(np.uint8)]


def overlay(
    img_bgr: np.ndarray, label: np.ndarray, opacity: float = 0.5, num_classes: int = len(PALETTE)
) -> np.ndarray:
    """Blend palette colours over an image: ``uint8(img * (1 - opacity) + colour * opacity)``.

    Args:
        img_bgr: ``[H, W, 3]`` uint8, BGR (OpenCV order).
        label: ``[H, W]`` train ids.
        opacity: weight of the palette colour in [0, 1].

    Returns:
        ``[H, W, 3]`` uint8 BGR (float64 blend truncated to uint8, as mmseg ``show_result``).
    """
    if not 0.0 <= opacity <= 1.0:
        raise ConfigError(f"--opacity must be in [0, 1], got {opacity}.")
    colour_bgr = colorize(label, num_classes)[..., ::-1]
    return (img_bgr.astype(np.float64) * (1.0 - opacity) + colour_bgr * opacity).astype(np.uint8)


@torch.no_grad()
def predict_image(
    model: nn.Module,
    img_bgr: np.ndarray,
    *,
    img_scale: Sequence[int] = (1024, 512),
    device: str | torch.device = "cpu",
    amp: str = "off",
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
) -> np.ndarray:
    """Predict the train-id map of one BGR image at its original size.

    Args:
        model: a ``Segmentor`` in eval mode on ``device``.
        img_bgr: ``[H, W, 3]`` uint8 BGR.
        img_scale: (long, short) keep-ratio test scale.

    Returns:
        ``[H, W]`` uint8 train ids.
    """
    from dida.data.transforms import TestPipeline
    from dida.engine.evaluate import autocast_context
    from dida.models import inference

    device = torch.device(device)
    img = TestPipeline(tuple(img_scale))(img_bgr).to(device)
    with autocast_context(device, amp):
        probs = inference(model, img[None], mode=mode, crop_size=crop_size, stride=stride,
                          out_size=tuple(img_bgr.shape[:2]))
    return probs.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


def list_images(path: str | Path, *, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """A single image file, or the images in a folder (sorted; sub-folders when ``recursive``).

    Files that look like this command's own outputs (``*_pred.png``, ``*_labelTrainIds.png``) and files
    under ``exclude`` (the output folder) are left out.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such image file or folder.")
    pattern = "**/*" if recursive else "*"
    exclude_resolved = exclude.resolve() if exclude is not None else None
    files = []
    for f in sorted(path.glob(pattern)):
        if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES or f.name.endswith(_OUTPUT_SUFFIXES):
            continue
        if exclude_resolved is not None and exclude_resolved in f.resolve().parents:
            continue
        files.append(f)
    return files


def _load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, str]:
    """Build the model described by ``--config`` or by the checkpoint, and load its weights."""
    from dida.checkpoint import load_checkpoint, model_cfg_from_checkpoint, read_checkpoint
    from dida.config import ModelCfg, load_config
    from dida.models import build_model

    ckpt_path = str(args.checkpoint)
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"{ckpt_path}: no such checkpoint file.")
    ckpt = read_checkpoint(ckpt_path, allow_pickle=args.allow_pickle)
    ckpt_cfg = model_cfg_from_checkpoint(ckpt)
    if args.config:
        model_cfg = load_config(args.config).model
        if ckpt_cfg is not None and ckpt_cfg.num_classes != model_cfg.num_classes:
            raise CheckpointError(
                f"{ckpt_path}: the checkpoint predicts {ckpt_cfg.num_classes} classes but {args.config} "
                f"says model.num_classes={model_cfg.num_classes}."
            )
        source = str(args.config)
    elif ckpt_cfg is not None:
        model_cfg, source = ckpt_cfg, "the checkpoint"
    else:
        model_cfg, source = ModelCfg(), "the default (MiT-B5, 19 classes)"
    model_cfg.pretrained = None
    model = build_model(model_cfg)
    load_checkpoint(model, ckpt, which=args.which, allow_pickle=args.allow_pickle)
    return model.to(device).eval(), source


def main_infer(args: argparse.Namespace) -> int:
    """``dida infer CHECKPOINT IMAGE_OR_DIR``: overlays and label maps; unreadable images are skipped."""
    import cv2
    from tqdm import tqdm

    from dida.data.transforms import load_image
    from dida.engine.evaluate import resolve_device, write_png

    if not 0.0 <= args.opacity <= 1.0:
        raise ConfigError(f"--opacity must be in [0, 1], got {args.opacity}.")
    if len(args.img_scale) != 2 or min(args.img_scale) <= 0:
        raise ConfigError(f"--img-scale needs two positive sizes, got {args.img_scale}.")
    device = resolve_device(args.device)
    out_dir = Path(args.out)
    inputs = Path(args.inputs)
    images = list_images(inputs, recursive=getattr(args, "recursive", False), exclude=out_dir)
    if not images:
        hint = ""
        if not getattr(args, "recursive", False) and list_images(inputs, recursive=True, exclude=out_dir):
            hint = " Its sub-folders hold images: add --recursive."
        raise DataError(f"{inputs}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}).{hint}")
    model, source = _load_model(args, device)
    num_classes = int(model.num_classes)
    print(f"model from {source}: {num_classes} classes; {len(images)} image(s) -> {out_dir}", file=sys.stderr)

    root = inputs if inputs.is_dir() else inputs.parent
    failed: list[tuple[Path, str]] = []
    done = 0
    for path in tqdm(images, unit="img", desc="infer", dynamic_ncols=True, file=sys.stderr,
                     disable=len(images) < 2):
        try:
            img = load_image(str(path))
        except (DidaError, cv2.error, OSError, ValueError) as e:
            failed.append((path, str(e)))
            tqdm.write(f"skipped {path}: {e}", file=sys.stderr)
            continue
        pred = predict_image(model, img, img_scale=args.img_scale, device=device, amp=args.amp)
        rel = path.relative_to(root).parent
        write_png(out_dir / rel / f"{path.stem}_pred.png", overlay(img, pred, args.opacity, num_classes))
        write_png(out_dir / rel / f"{path.stem}_labelTrainIds.png", pred)
        done += 1
    skipped = f"; {len(failed)} skipped (unreadable)" if failed else ""
    print(f"{done} image(s) written to {out_dir}{skipped}")
    for path, reason in failed:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    if done == 0:
        raise DataError(f"{inputs}: none of the {len(images)} image(s) could be read.")
    return 0
