"""Helpers of the reliability tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dida.config import Config, load_config


def data_overrides(data_root: Path) -> list[str]:
    return [f"data.source.root={data_root / 'gta'}", f"data.target.root={data_root / 'cs'}",
            f"data.val.root={data_root / 'cs'}"]


def tiny_cfg(data_root: Path, run_dir: Path, *extra: str) -> Config:
    return load_config("tiny_cpu", [f"run.dir={run_dir}", *data_overrides(data_root), *extra])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dida", *args]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class CreatesFile:
    """A pickle payload that runs code when loaded: unpickling it calls ``open(path, "w")``, creating the file
    (a safe loader must refuse it; the file's absence proves nothing ran)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))
