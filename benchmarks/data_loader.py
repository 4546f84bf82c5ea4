"""Training-loader throughput (samples/s) on a generated GTA + Cityscapes pair at the real scales.

    python -m benchmarks.data_loader [--workers 0 2] [--batches 20] [--source-images 16] [--dir DIR]

Generates GTA-size source images (1914x1052, labels converted, statistics written) and Cityscapes-size
target images (2048x1024), builds ``SourceTargetDataset`` with the reference pipelines (GTA:
resize (1280, 720), crop 512, cat_max_ratio 0.75, RCS T=0.01 min_pixels 3000; Cityscapes: resize
(1024, 512), crop 512) and times ``build_train_loader`` (batch 2) for each worker count after one
warm-up batch. One sample = one source + one target crop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--source-images", type=int, default=16)
    p.add_argument("--target-images", type=int, default=8)
    p.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = p.parse_args()

    from dida.data import CityscapesDataset, GTADataset, RareClassSampler
    from dida.data.fake import write_fake_cityscapes, write_fake_gta
    from dida.data.loader import build_train_loader
    from dida.data.transforms import TrainPipeline
    from dida.data.uda import SourceTargetDataset

    cv2.setNumThreads(1)  # one OpenCV thread per process, as in a multi-worker loader
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dida_loader_bench_"))
    try:
        t0 = time.perf_counter()
        gta = write_fake_gta(work / "gta", n=args.source_images, size=(1914, 1052), seed=0)
        cs = write_fake_cityscapes(work / "cityscapes", splits=("train",), n_per_split=args.target_images,
                                   size=(2048, 1024), seed=1)
        print(f"generated {args.source_images} GTA + {args.target_images} Cityscapes images in "
              f"{time.perf_counter() - t0:.1f} s ({os.cpu_count()} CPUs visible)")
        dataset = SourceTargetDataset(
            GTADataset(gta), CityscapesDataset(cs, "train"),
            TrainPipeline((1280, 720), (512, 512), cat_max_ratio=0.75, flip_prob=0.5),
            TrainPipeline((1024, 512), (512, 512), cat_max_ratio=1.0, flip_prob=0.5),
            rcs=RareClassSampler.from_stats(gta, temperature=0.01, min_pixels=3000), seed=0,
        )
        rows = []
        for workers in args.workers:
            loader = build_train_loader(dataset, args.batch_size, workers, seed=0)
            it = iter(loader)
            next(it)  # warm-up (worker start-up)
            t0 = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            elapsed = time.perf_counter() - t0
            del it, loader
            rows.append((workers, elapsed))
        n = args.batches * args.batch_size
        print(f"{'workers':>7} {'batches':>7} {'seconds':>8} {'samples/s':>10}")
        for workers, elapsed in rows:
            print(f"{workers:>7} {args.batches:>7} {elapsed:>8.2f} {n / elapsed:>10.2f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
