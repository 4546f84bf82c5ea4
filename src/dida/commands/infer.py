"""``dida infer CHECKPOINT IMAGE_OR_DIR``: palette overlays and train-id maps of your own images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dida.config import MAX_IMAGE_SIDE
from dida.engine.hrda_outputs import align_input, attention_image, hrda_branch
from dida.engine.predict import IMAGE_SUFFIXES, list_images, predict_image
from dida.errors import CheckpointError, ConfigError, DataError, DidaError
from dida.io import claim_output, write_png
from dida.runtime import inference_precision, resolve_device
from dida.visualize import overlay

__all__ = ["main"]


def _load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Any]:
    """The model described by ``--config`` or by the checkpoint's stored configuration, with its weights.

    Returns:
        (the model in eval mode on ``device``, the ``ResolvedConfig`` whose test settings apply).
    """
    from dida.checkpoint import load_checkpoint, read_checkpoint
    from dida.engine.checkpoint_config import config_for_checkpoint
    from dida.hub import resolve
    from dida.models import build_model

    ckpt_path = str(resolve(args.checkpoint, which=args.which))  # hf:// -> the Hub cache
    if not Path(ckpt_path).exists():
        raise CheckpointError(f"{ckpt_path}: no such checkpoint file or exported model folder.")
    ckpt = read_checkpoint(ckpt_path, allow_pickle=args.allow_pickle)
    resolved = config_for_checkpoint(ckpt, where=ckpt_path, config=args.config)
    model = build_model(resolved.cfg.model)
    load_checkpoint(model, ckpt, which=args.which, allow_pickle=args.allow_pickle, source=ckpt_path,
                    segmentor_only=True)
    hrda_out = getattr(args, "hrda_out", None)
    if hrda_out:
        model = hrda_branch(model, hrda_out, source=f"{ckpt_path} ({resolved.describe()})")
    # HRDA needs input sizes that are multiples of a context cell: pad, predict, crop.
    return align_input(model).to(device).eval(), resolved


def _attention(model: nn.Module, img_bgr: Any, args: argparse.Namespace, device: torch.device) -> Any:
    """``--hrda-out att``: the attention map of one BGR image at its size, uint8 (x255)."""
    from dida.data.transforms import TestPipeline
    from dida.runtime import autocast

    img = TestPipeline(tuple(args.img_scale))(img_bgr).to(device, next(model.parameters()).dtype)
    with torch.no_grad(), autocast(device, args.amp):
        return attention_image(model, img[None], out_size=img_bgr.shape[:2])


def _find_images(inputs: Path, out_dir: Path, recursive: bool) -> list[Path]:
    """The images to predict; none is an error (with a hint when sub-folders hold some)."""
    images = list_images(inputs, recursive=recursive, exclude=out_dir)
    if not images:
        hint = ""
        if not recursive and list_images(inputs, recursive=True, exclude=out_dir):
            hint = " Its sub-folders hold images: add --recursive."
        raise DataError(f"{inputs}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}).{hint}")
    return images


def _output_stems(images: list[Path], root: Path) -> dict[Path, Path]:
    """Each image's output stem relative to ``--out`` (its sub-folder and name without suffix). Images of one
    folder that share a name (``a.png``, ``a.jpg``) keep their suffix in it (``a_png``, ``a_jpg``), so that no
    prediction overwrites another."""
    stems = {p: p.relative_to(root).parent / p.stem for p in images}
    counts: dict[Path, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {p: (stem.parent / f"{p.stem}_{p.suffix.lstrip('.')}" if counts[stem] > 1 else stem)
            for p, stem in stems.items()}


def main(args: argparse.Namespace) -> int:
    """``dida infer CHECKPOINT IMAGE_OR_DIR``: overlays and label maps; unreadable images are skipped."""
    import cv2
    from tqdm import tqdm

    from dida.data.transforms import load_image

    if not 0.0 <= args.opacity <= 1.0:
        raise ConfigError(f"--opacity must be in [0, 1], got {args.opacity}.")
    if args.img_scale is not None and (len(args.img_scale) != 2 or min(args.img_scale) <= 0
                                       or max(args.img_scale) > MAX_IMAGE_SIDE):
        raise ConfigError(f"--img-scale needs two sizes in [1, {MAX_IMAGE_SIDE}], got {args.img_scale}.")
    device = resolve_device(args.device)
    out_dir = Path(args.out)
    inputs = Path(args.inputs)
    images = _find_images(inputs, out_dir, getattr(args, "recursive", False))
    root = inputs if inputs.is_dir() else inputs.parent
    stems = _output_stems(images, root)
    attention = getattr(args, "hrda_out", None) == "att"
    suffixes = ("_attention.png",) if attention else ("_pred.png", "_labelTrainIds.png")
    claim_output(out_dir, kind="dir", files=[f"{stem}{suffix}" for stem in stems.values() for suffix in suffixes],
                 inputs=images, force=bool(getattr(args, "force", False)), option="--out")
    model, resolved = _load_model(args, device)
    model, args.amp = inference_precision(model, args.amp)  # bf16: the weights themselves, no autocast
    cfg = resolved.cfg
    args.img_scale = tuple(args.img_scale or cfg.data.val.img_scale)
    mode = args.mode or cfg.eval.mode
    if mode == "slide":
        from dida.config import validate

        cfg.eval.mode = mode
        validate(cfg)  # the windows and stride of the model's configuration
    num_classes = int(model.num_classes)
    what = "HRDA attention maps" if attention else f"{num_classes} classes"
    print(f"{cfg.model.segmentor} on {cfg.model.backbone}, {what}; test scale {args.img_scale[0]}x"
          f"{args.img_scale[1]}, {mode} inference ({resolved.describe()}); {len(images)} image(s) -> {out_dir}",
          file=sys.stderr)

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
        stem = stems[path]
        try:
            if attention:
                write_png(out_dir / f"{stem}_attention.png", _attention(model, img, args, device))
                done += 1
                continue
            pred = predict_image(model, img, img_scale=args.img_scale, device=device, amp=args.amp, mode=mode,
                                 crop_size=cfg.eval.crop_size, stride=cfg.eval.stride)
        except DataError as e:  # e.g. an image too thin for the test scale
            failed.append((path, str(e)))
            tqdm.write(f"skipped {path}: {e}", file=sys.stderr)
            continue
        write_png(out_dir / f"{stem}_pred.png", overlay(img, pred, args.opacity, num_classes))
        write_png(out_dir / f"{stem}_labelTrainIds.png", pred)
        done += 1
    skipped = f"; {len(failed)} skipped (unreadable)" if failed else ""
    print(f"{done} image(s) written to {out_dir}{skipped}")
    for path, reason in failed:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    if done == 0:
        reason = f" ({failed[0][1]})" if len(failed) == 1 else " (the reasons are listed above)"
        raise DataError(f"{inputs}: none of the {len(images)} image(s) could be used{reason}.")
    return 0
