"""Label conversion speed (`dida convert gta`) on generated GTA-size label files.

    python -m benchmarks.convert_labels [--files 1000] [--nproc 1 2] [--size 1914 1052] [--dir DIR]

Writes ``--files`` palette PNGs of label ids (1914x1052, blocks of ~12 classes, like GTA's labels),
then times, for each ``--nproc``: a full conversion (``--force``: read, map, write train ids, collect
statistics) and a resumed run (every output exists: only re-reading outputs for the statistics).
Prints files/s per setting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_labels(root: Path, n: int, size: tuple[int, int], nproc: int) -> None:
    from multiprocessing import Pool

    (root / "labels").mkdir(parents=True, exist_ok=True)
    with Pool(max(1, nproc)) as pool:
        pool.starmap(_write_one, [(root, i, size) for i in range(n)], chunksize=16)


def _write_one(root: Path, i: int, size: tuple[int, int]) -> None:
    from dida.constants import CITYSCAPES_ID_TO_TRAINID
    from dida.data.fake import block_label_map, write_gta_label

    rng = np.random.default_rng(i)
    ids = sorted(CITYSCAPES_ID_TO_TRAINID) + [0, 1, 4]
    write_gta_label(root / "labels" / f"{i + 1:05d}.png",
                    block_label_map(size, ids, rng, grid=(24, 12), classes_per_image=12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1000, help="number of label files (default 1000)")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    p.add_argument("--size", type=int, nargs=2, default=(1914, 1052), metavar=("W", "H"))
    p.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = p.parse_args()

    from dida.data.convert import convert_dataset

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dida_convert_bench_"))
    root = work / "gta"
    try:
        t0 = time.perf_counter()
        _write_labels(root, args.files, tuple(args.size), max(args.nproc))
        print(f"generated {args.files} label files of {args.size[0]}x{args.size[1]} in "
              f"{time.perf_counter() - t0:.1f} s ({os.cpu_count()} CPUs visible)")
        rows = []
        for nproc in args.nproc:
            t0 = time.perf_counter()
            summary = convert_dataset("gta", root, nproc=nproc, force=True, progress=False)
            full = time.perf_counter() - t0
            assert summary["converted"] == args.files
            t0 = time.perf_counter()
            summary = convert_dataset("gta", root, nproc=nproc, force=False, progress=False)
            resumed = time.perf_counter() - t0
            assert summary["skipped"] == args.files
            rows.append((nproc, full, resumed))
        print(f"{'nproc':>5} {'convert s':>10} {'files/s':>9} {'resume s':>9} {'files/s':>9}")
        for nproc, full, resumed in rows:
            print(f"{nproc:>5} {full:>10.2f} {args.files / full:>9.1f} "
                  f"{resumed:>9.2f} {args.files / resumed:>9.1f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
