"""``dida convert KIND ROOT [--nproc N] [--force]``: label ids -> train ids, plus the class statistics.

The converter of each kind is the one ``dida.data.kinds.DATASET_KINDS`` names.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from dida.data.kinds import DATASET_KINDS, convertible_kinds
from dida.errors import DataError

__all__ = ["converter", "main"]


def converter(kind: str) -> Callable[..., dict[str, int]]:
    """The label converter of a dataset kind: ``fn(kind, root, nproc=, force=) -> summary``."""
    entry = DATASET_KINDS.get(kind)
    if entry is None or entry.converter is None:
        raise DataError(f"unknown dataset kind '{kind}'; choose one of {', '.join(convertible_kinds())}.")
    module_name, func_name = entry.converter.split(":")
    fn: Any = getattr(importlib.import_module(module_name), func_name)
    return fn


def main(args: argparse.Namespace) -> int:
    """CLI: ``dida convert gta|synthia|cityscapes ROOT [--nproc N] [--force]``."""
    summary = converter(args.dataset)(args.dataset, args.root, nproc=args.nproc, force=args.force)
    print(
        f"{args.dataset}: {summary['files']} label files, {summary['converted']} converted, "
        f"{summary['skipped']} already done; statistics written to {args.root}"
    )
    return 0
