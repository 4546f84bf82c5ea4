"""Output files: claiming an output path before any work (``claim_output``), and atomic writes with the modes a
plain ``open`` would give (every checkpoint, cache, converted label, prediction PNG and report uses these).

Every command that writes a file or a folder claims it first: an existing output is replaced only with
``--force``, an output that is its own input never, and a file where a folder is needed (or the reverse), a
read-only folder or a full disk are reported in one line before minutes of work are spent. Writes are atomic
(temporary file + rename), so an interrupted or failed write leaves the previous file as it was; the written
file gets the permissions of the file it replaces, or ``0o666`` less the umask (never ``mkstemp``'s private
``0o600``, which would make a shared dataset unreadable to colleagues).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_path", "atomic_torch_save", "claim_output", "default_mode", "make_temp_dir",
           "write_png"]


def _umask() -> int:
    """The process umask (read without changing it where /proc allows, else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions ``open`` / ``mkdir`` would give a new file / folder: ``0o666`` / ``0o777`` less the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _with_destination(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` (the destination the user chose), not a temporary name or nothing at all."""
    e.filename, e.filename2 = str(path), None
    return e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``path`` only on success.

    The temporary name keeps the destination's suffix so that writers that pick a format from the
    extension (OpenCV, PIL, numpy) still work. On any exception the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched; an ``OSError`` (disk full, read-only folder, a
    folder at ``path``) names ``path``. The file gets the mode of the file it replaces, else
    ``default_mode()``.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if path.exists() else default_mode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except OSError as e:
        raise _with_destination(e, path) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # again: a writer may have replaced the file with one of its own mode (safetensors)
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError):
            raise _with_destination(e, path)
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


def make_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new folder in ``parent`` (for a folder renamed into place when complete) with the mode ``mkdir`` would
    give, not ``mkdtemp``'s private ``0o700``."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    path.chmod(default_mode(directory=True))
    return path


def write_png(path: str | os.PathLike[str], array: Any) -> None:
    """Write a uint8 ``[H, W]`` or BGR ``[H, W, 3]`` array as PNG (OpenCV encodes it in memory; the bytes are
    written atomically, so a full disk or a read-only folder raises an ``OSError`` naming ``path``).

    Raises:
        DataError: OpenCV could not encode the array.
    """
    import cv2

    from dida.errors import DataError

    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"{path}: OpenCV could not encode a {getattr(array, 'shape', '?')} array as PNG.")
    with atomic_open(path, "wb") as f:
        f.write(data.tobytes())


# ------------------------------------------------------------------------------------- claiming outputs


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _probe_writable(folder: Path, named: Path) -> None:
    """Create and remove a file in ``folder``: a read-only or full file system fails here, before any work
    (the error names ``named``, the output the user asked for)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dida-write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise _with_destination(e, named) from None


def claim_output(
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    kind: str = "file",
    files: Iterable[str] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    option: str = "the output",
) -> Path:
    """Check that the command may write ``path`` before it does any work, and prepare its folder.

    Args:
        path: the output file (``kind="file"``) or folder (``kind="dir"``).
        force: replace existing outputs (``--force``).
        files: for a folder, the names (relative paths) the command writes into it; an existing one needs
            ``force``. None: any existing content of the folder needs ``force``.
        inputs: files the command reads; an output that is one of them is refused even with ``force``.
        option: how the command line names the output (``--out``, ``OUTPUT``), for the messages.

    Returns:
        ``path`` as a ``Path``. Nothing is created: the nearest existing folder on the way is checked to be
        writable (a read-only or full disk fails here, before any work).

    Raises:
        DidaError: the output exists without ``force``, is an input, or is a file where a folder is needed
            (or the reverse); OSError (naming the path) when the folder cannot be created or written.
    """
    from dida.errors import DidaError

    path = Path(path)
    for src in inputs:
        if _same_file(path, Path(src)):
            raise DidaError(f"{path}: {option} is the input {src}; writing it would destroy the input. Choose "
                            "another output path.")
    for parent in [path, *path.parents]:
        if parent.is_symlink() and not parent.exists():
            raise DidaError(f"{parent}: is a symbolic link to a missing target (or a loop of links), so {option} "
                            "cannot be written there. Fix or remove the link, or choose another path.")
        if parent is path and kind == "file":
            continue
        if parent.exists() and not parent.is_dir():
            raise DidaError(f"{parent}: is a file, but {option} needs a folder here. Remove it or choose another "
                            "path.")
        if parent.exists():
            break
    if kind == "file":
        if path.is_dir():
            raise DidaError(f"{path}: is a folder; {option} must be a file path (e.g. {path / 'out.pth'}).")
        if path.exists() and not force:
            raise DidaError(f"{path}: already exists; pass --force to replace it, or choose another {option}.")
        folder = path.parent
    else:
        existing = []
        if path.is_dir():
            if files is None:
                existing = sorted(p.name for p in path.iterdir())
            else:
                existing = [name for name in files if (path / name).exists()]
        if existing and not force:
            shown = ", ".join(str(path / name) for name in existing[:3])
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise DidaError(f"{path}: {option} already holds {shown}{more}; pass --force to replace them, or "
                            "choose another folder.")
        folder = path
    existing_folder = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if os.path.abspath(existing_folder) != os.path.abspath(folder):
        _probe_writable(existing_folder, folder)
    else:
        _probe_writable(folder, folder)
    return path
