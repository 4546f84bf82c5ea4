"""``dida demo [--out DIR] [--seed N] [--iters N] [--quick]``: the embedded default, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from dida.engine.demo import run_demo
from dida.errors import DidaError

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """``dida demo [--out DIR] [--seed N] [--iters N] [--quick]``."""
    iters = getattr(args, "iters", None)
    if iters is not None and iters < 1:
        raise DidaError(f"--iters must be at least 1, got {iters}.")
    run_demo(Path(args.out), seed=int(getattr(args, "seed", 0)), iters=iters,
             quick=bool(getattr(args, "quick", False)), force=bool(getattr(args, "force", False)))
    return 0
