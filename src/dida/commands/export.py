"""``dida export RUN_DIR --to DIR | --to-hub ORG/REPO``: a Hub-ready model folder, optionally uploaded."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dida.errors import ConfigError
from dida.export import export_folder, upload_folder
from dida.hub import HF_SCHEME, parse_ref

__all__ = ["main"]


def _repo_id(value: str) -> str:
    ref = parse_ref(value if value.startswith(HF_SCHEME) else HF_SCHEME + value)
    if ref.filename or ref.revision:
        raise ConfigError(f"--to-hub {value}: name a repository only (ORG/REPO), without a file or revision.")
    return ref.repo_id


def _summary(folder: Path, meta: dict) -> None:
    print(f"exported {meta['source']} ({meta['method']}, iteration {meta['iteration']}) -> {folder}")
    for name, info in meta["files"].items():
        print(f"  {name}: {info['which']}, {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB, "
              f"sha256 {info['sha256'][:16]}...")
    print(f"  config.yaml, dida_export.json, README.md (model card{'' if meta['metrics'] else ', no dida test metrics'})")


def main(args: argparse.Namespace) -> int:
    """``dida export SOURCE --to DIR`` and/or ``--to-hub ORG/REPO``."""
    if not args.to and not args.to_hub:
        raise ConfigError("dida export: give --to DIR (a local folder) and/or --to-hub ORG/REPO.")
    repo_id = _repo_id(args.to_hub) if args.to_hub else None
    options = {"checkpoint": args.checkpoint, "config": args.config, "metrics": args.metrics,
               "repo_id": repo_id, "allow_pickle": args.allow_pickle}
    if args.to:
        folder = Path(args.to)
        _summary(folder, export_folder(args.source, folder, force=args.force, **options))
        if repo_id:
            url = upload_folder(folder, repo_id, private=args.private, force=args.force, message=args.message,
                                keep_hint=f" (the folder stays at {folder}: hf upload {repo_id} {folder})")
            print(f"uploaded to {url}\n  use it as hf://{repo_id}")
        return 0
    assert repo_id is not None
    with tempfile.TemporaryDirectory(prefix="dida-export-") as tmp:
        folder = Path(tmp) / repo_id.split("/")[1]
        _summary(folder, export_folder(args.source, folder, **options))
        url = upload_folder(folder, repo_id, private=args.private, force=args.force, message=args.message,
                            keep_hint=" (add --to DIR to keep a local copy of the folder)")
    print(f"uploaded to {url}\n  use it as hf://{repo_id}")
    return 0
