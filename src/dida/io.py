"""Atomic file writes: every checkpoint, cache, converted label, prediction PNG and report uses these."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``path`` only on success.

    The temporary name keeps the destination's suffix so that writers that pick a format from the
    extension (OpenCV, PIL, numpy) still work. On any exception the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` for writing whose result appears at ``path`` only once the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file, fsync, then rename onto ``path``."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def write_png(path: str | os.PathLike[str], array: Any) -> None:
    """Write a uint8 ``[H, W]`` or BGR ``[H, W, 3]`` array as PNG (OpenCV), atomically.

    Raises:
        DataError: OpenCV could not write the file.
    """
    import cv2

    from dida.errors import DataError

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), array):
            raise DataError(f"{path}: could not write the PNG (disk full or no permission?).")
