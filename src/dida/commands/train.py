"""``dida train PRESET_OR_YAML [key=value ...]`` and ``dida train --resume RUN_DIR [key=value ...]``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dida.config import describe_schema, load_config, preset_descriptions
from dida.engine.train import train
from dida.errors import ConfigError, DidaError

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    if args.list_presets:
        presets = preset_descriptions()
        width = max(len(name) for name in presets)
        print("\n".join(f"{name:<{width}}  {text}".rstrip() for name, text in presets.items()))
        return 0
    if args.help_config:
        print(describe_schema())
        return 0
    overrides = list(args.overrides)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise DidaError(f"{run_dir}: not a run directory (no config.yaml). Give the folder of an earlier run.")
        if args.config is not None:  # `dida train --resume DIR key=value`: argparse put the first override here
            overrides.insert(0, args.config)
        cfg = load_config(str(run_dir), overrides)
        cfg.run.dir = str(run_dir)
        train(cfg, resume=run_dir)
        return 0
    if args.config is None:
        raise ConfigError("give a preset or YAML (see `dida train --list-presets`), or --resume RUN_DIR.")
    cfg = load_config(args.config, overrides)
    run_dir = train(cfg, force=bool(getattr(args, "force", False)))
    if os.environ.get("RANK", "0") == "0":
        print(f"Done: {run_dir}")
    return 0
