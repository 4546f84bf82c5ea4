"""``dida synth ROOT``: generate the synthetic domain-shift benchmark (GTA-like source, Cityscapes-like target)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dida.data.synthetic import MANIFEST_NAME, SynthParams, check_params, generate
from dida.io import claim_output

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """``dida synth ROOT``: write the synthetic GTA-like source and Cityscapes-like target."""
    width, height = (int(v) for v in args.size)
    params = SynthParams(seed=args.seed, num_source=args.num_source, num_target_train=args.num_target_train,
                         num_val=args.num_val, width=width, height=height)
    check_params(params, nproc=args.nproc)
    force = bool(getattr(args, "force", False))
    claim_output(args.root, kind="dir", files=["gta", "cityscapes", MANIFEST_NAME], force=force, option="ROOT")
    if force:  # files of an earlier set (other sizes or counts) must not join the new one
        for sub in ("gta", "cityscapes"):
            shutil.rmtree(Path(args.root) / sub, ignore_errors=True)
    root = generate(args.root, params, nproc=args.nproc)
    print(f"dida synth: wrote {params.num_source} source, {params.num_target_train} target-train and "
          f"{params.num_val} val images of {width}x{height} under {root}")
    print(f"next: dida convert gta {root / 'gta'} && dida convert cityscapes {root / 'cityscapes'}")
    return 0
