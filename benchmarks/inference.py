"""Whole-image inference speed of MiT + DAFormer head at the Cityscapes test scale, split by stage.

    python -m benchmarks.inference [--device cpu|cuda] [--backbone mit_b5] [--iters N] [--amp bf16]

Per image, sequentially (batch 1, the reference's test loop):
  pre-processing  decode a generated 2048x1024 PNG (OpenCV) + keep-ratio resize to 1024x512 + normalise
  backbone        MiT forward on [1, 3, 512, 1024]
  head            DAFormer head (embeddings, ASPP fusion, classifier) -> logits at 1/4 resolution
  post-processing logits -> 512x1024 -> 1024x2048 (bilinear), softmax, argmax

Threads are fixed (``--threads``, default all cores) for torch and OpenCV. On CUDA every stage is timed
between synchronisations, so the shares are exact but overlap (e.g. decoding the next image while the
GPU works) is not exploited: images/s is the single-stream rate of the reference loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dida.runtime import AMP_DTYPES


def _write_test_png(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A street-scene-like PNG (palette blocks + noise) so that decoding costs what real images cost."""
    import cv2

    from dida.constants import CITYSCAPES_ID_TO_TRAINID, PALETTE
    from dida.data.fake import block_label_map

    rng = np.random.default_rng(seed)
    ids = block_label_map((width, height), sorted(CITYSCAPES_ID_TO_TRAINID), rng, grid=(16, 8),
                          classes_per_image=12)
    lut = np.zeros((256,), dtype=np.int64)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    noise = rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    rgb = np.asarray(PALETTE, dtype=np.int16)[lut[ids]] + noise
    cv2.imwrite(str(path), np.clip(rgb, 0, 255).astype(np.uint8)[:, :, ::-1])


def _timer(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="mit_b5")
    parser.add_argument("--iters", type=int, default=10, help="timed images")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off")
    parser.add_argument("--size", type=int, nargs=2, default=(2048, 1024), metavar=("W", "H"),
                        help="size of the generated input image")
    parser.add_argument("--img-scale", type=int, nargs=2, default=(1024, 512), metavar=("LONG", "SHORT"))
    args = parser.parse_args(argv)

    import cv2

    from dida.config import ModelCfg
    from dida.data.transforms import TestPipeline, load_image
    from dida.models import build_model
    from dida.models.ops import resize
    from dida.runtime import autocast

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    device = torch.device(args.device)
    model_cfg = ModelCfg(backbone=args.backbone, num_classes=19)
    model = build_model(model_cfg, generator=torch.Generator().manual_seed(0)).to(device).eval()
    pipeline = TestPipeline(args.img_scale)
    now = _timer(device)
    stages: dict[str, list[float]] = {"pre-processing": [], "backbone": [], "head": [], "post-processing": []}

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        png = Path(tmp) / "frankfurt_000000_000000_leftImg8bit.png"
        _write_test_png(png, *args.size)
        for it in range(args.warmup + args.iters):
            t0 = now()
            img_bgr = load_image(png)
            img = pipeline(img_bgr)[None].to(device, non_blocking=True)
            t1 = now()
            with autocast(device, args.amp):
                feats = model.extract_features(img)
                t2 = now()
                _, logits = model.decode_head(feats)
                t3 = now()
                logits = resize(resize(logits, img.shape[-2:]), img_bgr.shape[:2])
                pred = logits.softmax(dim=1).argmax(dim=1).to(torch.uint8).cpu()
            t4 = now()
            if it >= args.warmup:
                for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    stages[name].append(dt)
    assert pred.shape[-2:] == img_bgr.shape[:2]

    medians = {k: statistics.median(v) for k, v in stages.items()}
    total = sum(medians.values())
    model_only = medians["backbone"] + medians["head"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)"
    print(f"{args.backbone} + DAFormer head, input {args.size[0]}x{args.size[1]} -> "
          f"{tuple(img.shape[-1:-3:-1])} (w, h), {name}, amp={args.amp}, "
          f"median of {args.iters} images after {args.warmup} warm-up, torch {torch.__version__}")
    print(f"{'stage':<16} | {'ms/image':>10} | {'share':>6}")
    print(f"{'-' * 16}-+-{'-' * 10}-+-{'-' * 6}")
    for k, v in medians.items():
        print(f"{k:<16} | {1000 * v:>10.1f} | {100 * v / total:>5.1f}%")
    print(f"{'-' * 16}-+-{'-' * 10}-+-{'-' * 6}")
    print(f"{'total':<16} | {1000 * total:>10.1f} | {100.0:>5.1f}%")
    print(f"images/s: {1 / total:.2f} end to end (single stream), {1 / model_only:.2f} model only")


if __name__ == "__main__":
    main()
