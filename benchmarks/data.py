"""Data benchmark: label conversion (files/s, --nproc 1 vs 2) and the training loader (samples/s, 0 vs 2
workers), one after the other in one command.

    python -m benchmarks.data [--files 1000]
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import convert_labels, data_loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1000, help="label files for the conversion benchmark")
    args = p.parse_args()
    argv = sys.argv
    try:
        sys.argv = [argv[0], "--files", str(args.files)]
        convert_labels.main()
        print()
        sys.argv = [argv[0]]
        data_loader.main()
    finally:
        sys.argv = argv


if __name__ == "__main__":
    main()
