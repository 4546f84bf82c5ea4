"""Reading and writing checkpoint files, safely and atomically.

Files are opened with ``torch.load(weights_only=True)``: a file that needs arbitrary Python objects is
refused unless the user passes ``--allow-pickle``. ``.safetensors`` files go through ``safetensors``.
``hf://`` references are first resolved to a local file by ``dida.hub.resolve`` (the Hub cache), and a
folder written by ``dida export`` reads as a dida checkpoint (its models, config and iteration).
Every write is atomic (temporary file + rename) and holds only values a safe load accepts.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dida.checkpoint.formats import first
from dida.errors import CheckpointError
from dida.hub import EXPORT_CONFIG, EXPORT_META, export_files, file_sha256, is_export_folder, resolve
from dida.io import atomic_torch_save

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "describe_source", "plain", "read_checkpoint", "read_export_folder",
    "save_checkpoint",
]

FORMAT_NAME = "dida"
# 2: term state under "terms" (version 1 had "imnet_model" / "instance_bank" at the top level).
FORMAT_VERSION = 2


# OSErrors that say the file cannot be read at all (rather than that its content is damaged).
_READ_ERRNOS = {errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ESTALE}


def describe_source(source: str | os.PathLike[str] | None) -> str:
    return str(source) if source is not None else "<in-memory checkpoint>"


def read_checkpoint(path: str | os.PathLike[str], allow_pickle: bool = False) -> dict[str, Any]:
    """Load a checkpoint file (an ``hf://`` reference, a dida export folder, or a Hugging Face model folder's
    ``model.safetensors``) into a dict on the CPU, safely.

    ``hf://`` references are downloaded into (or found in) the Hugging Face cache first; an export folder
    reads as a dida checkpoint (``read_export_folder``). ``.safetensors`` files go through
    ``safetensors.torch.load_file``; everything else through ``torch.load(weights_only=not allow_pickle)``.

    Raises:
        CheckpointError: missing file; a file that needs arbitrary Python objects (names the object and
            the ``--allow-pickle`` flag); a truncated or non-checkpoint file; a file holding no dict; any
            ``hf://`` problem (``dida.hub.HubError``, one line saying what to do).
    """
    path = resolve(path)
    if is_export_folder(path):
        return read_export_folder(path, allow_pickle=allow_pickle)
    if path.is_dir() and (path / "model.safetensors").is_file():  # a Hugging Face model folder
        path = path / "model.safetensors"
    if not path.is_file():
        from dida.zoo import missing_file_hint

        what = "is a folder, not a checkpoint file nor an exported model folder" if path.is_dir() else \
            "checkpoint not found (no such file)"
        raise CheckpointError(f"{path}: {what}. Check the path.{missing_file_hint(path)}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own SafetensorError / OSError types
            raise CheckpointError(
                f"{path}: cannot read the safetensors file ({e}); it is truncated or not a checkpoint. "
                "Download or copy it again."
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", msg)
        name = found.group(1) if found is not None else _unsafe_global(path)
        if not allow_pickle and name is not None:
            raise CheckpointError(
                f"{path}: refusing to unpickle the Python object {name!r}: loading it could run "
                "arbitrary code. If you trust the file's source, re-run with --allow-pickle "
                "(allow_pickle=True)."
            ) from None
        detail = [line for line in msg.splitlines() if line.strip()]
        reason = detail[-2].strip()[:120] if len(detail) >= 2 else msg[:120]
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint (cannot be unpickled: {reason}). "
            "Download or copy it again."
        ) from None
    except RuntimeError as e:
        text = str(e)
        if "zip archive" in text or "PytorchStreamReader" in text or "corrupt" in text.lower():
            raise CheckpointError(
                f"{path}: truncated or not a checkpoint (the zip container is damaged: "
                f"{text.split('. ')[0][:120]}). "
                "Download or copy it again."
            ) from None
        if "legacy .tar format" in text:  # also what torch takes a file of zero bytes (a zeroed block) for
            raise CheckpointError(
                f"{path}: truncated or not a checkpoint (a tar archive, or zeroed data; torch's legacy .tar "
                "format cannot be loaded safely). Download or copy it again; a trusted legacy torch file needs "
                "--allow-pickle."
            ) from None
        raise CheckpointError(f"{path}: cannot load the checkpoint: {text[:300]}") from None
    except OSError as e:
        if e.errno in _READ_ERRNOS:  # cannot be read (permissions, I/O error): the command line reports it
            e.filename = e.filename or str(path)
            raise
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint ({type(e).__name__}: {str(e)[:120]}). "
            "Download or copy it again."
        ) from None
    except Exception as e:
        name = None if allow_pickle else _unsafe_global(path)
        if name is not None:
            raise CheckpointError(
                f"{path}: refusing to unpickle the Python object {name!r}: loading it could run arbitrary code. "
                "If you trust the file's source, re-run with --allow-pickle (allow_pickle=True)."
            ) from None
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint ({type(e).__name__}: {str(e)[:120]}). "
            "Download or copy it again."
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; not a checkpoint dida can read."
        )
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: holds a dict whose keys are not all names (strings); not a checkpoint dida "
                              "can read.")
    return dict(obj)


def _pickle_streams(path: Path) -> list[bytes]:
    """The pickle bytes of a checkpoint file: ``data.pkl`` of a zip checkpoint, else the whole file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
    return [path.read_bytes()]


def _unsafe_global(path: Path) -> str | None:
    """The first Python object a pickle in ``path`` names that the safe loader does not allow (the opcodes
    GLOBAL, INST and STACK_GLOBAL), or None (none found, or not a pickle at all). Read without executing."""
    import pickletools

    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = set(_get_allowed_globals())
    allowed.update(f"{getattr(g, '__module__', '')}.{getattr(g, '__name__', '')}"
                   for g in torch.serialization.get_safe_globals() if not isinstance(g, tuple))
    try:
        streams = _pickle_streams(path)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return None
    for data in streams:
        pos, strings = 0, []
        while pos < len(data):  # a legacy torch file is several pickles in a row
            try:
                for op, arg, end in pickletools.genops(data[pos:]):
                    if op.name in ("GLOBAL", "INST"):
                        name = ".".join(str(arg).split(" ", 1))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        name = f"{strings[-2]}.{strings[-1]}"
                    else:
                        if isinstance(arg, str):
                            strings.append(arg)
                        if op.name == "STOP":
                            pos += (end or 0) + 1
                            break
                        continue
                    if name not in allowed:
                        return name
                else:
                    break
            except Exception:
                break
    return None


def read_export_folder(folder: str | os.PathLike[str], allow_pickle: bool = False) -> dict[str, Any]:
    """A folder written by ``dida export``, as a dida checkpoint held in memory.

    ``model`` / ``ema_model`` come from ``model.safetensors`` / ``ema_model.safetensors`` (None when the file
    is absent), ``config`` from ``config.yaml``, ``iteration`` from ``dida_export.json``. Each weights file is
    checked against the sha256 recorded in ``dida_export.json`` before it is read.

    Raises:
        CheckpointError: a weights file whose sha256 differs from the recorded one; an unreadable file.
    """
    folder = Path(folder)
    meta: dict[str, Any] = {}
    meta_path = folder / EXPORT_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: unreadable ({e}); export or download the folder again.") from None
    recorded = meta.get("files") if isinstance(meta.get("files"), Mapping) else {}
    out: dict[str, Any] = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "model": None, "ema_model": None, "terms": {},
        "optimizer": None, "iteration": meta.get("iteration"), "config": (folder / EXPORT_CONFIG).read_text(),
        "meta": {"source": str(folder), "export": {k: v for k, v in meta.items() if k != "files"}},
    }
    for which, file in export_files(folder).items():
        expected = (recorded.get(file.name) or {}).get("sha256")
        if isinstance(expected, str) and len(expected) == 64:
            got = file_sha256(file)
            if got != expected:
                raise CheckpointError(
                    f"{file}: sha256 {got[:12]}... differs from the {expected[:12]}... recorded in {EXPORT_META}: "
                    "the file is corrupted or was replaced; refusing to load it. Export or download it again."
                )
        out[which] = read_checkpoint(file, allow_pickle=allow_pickle)
    return out


# ----------------------------------------------------------------------------------------- writing

_PLAIN = (
    str, bytes, int, float, bool, complex, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device
)


def _unsafe_values(obj: Any, where: str = "", out: list[str] | None = None) -> list[str]:
    """Paths of values that ``torch.load(weights_only=True)`` would refuse (numpy arrays, objects)."""
    out = [] if out is None else out
    if isinstance(obj, Mapping):
        if type(obj) not in (dict, OrderedDict):
            out.append(f"{where or '<root>'} ({type(obj).__name__})")
        for k, v in obj.items():
            _unsafe_values(v, f"{where}.{k}" if where else str(k), out)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        if type(obj) not in (list, tuple, set, frozenset, torch.Size):
            out.append(f"{where} ({type(obj).__name__})")
        for i, v in enumerate(obj):
            _unsafe_values(v, f"{where}[{i}]", out)
    elif not isinstance(obj, _PLAIN) or (type(obj) not in _PLAIN and not isinstance(obj, torch.Tensor)):
        out.append(f"{where} ({type(obj).__module__}.{type(obj).__name__})")
    return out


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write a dida checkpoint atomically (temporary file + rename).

    ``state`` follows the dida format: ``model``, ``ema_model``, ``optimizer``, ``scheduler``,
    ``iteration``, ``config`` (YAML text), ``rng``, ``instance_bank``, ``meta``; ``format`` and
    ``version`` are filled in. Only plain types and tensors are allowed, so that the file loads with
    ``weights_only=True``.

    Raises:
        CheckpointError: values that a safe load would refuse (numpy arrays/scalars, arbitrary objects).
    """
    full = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **state}
    bad = _unsafe_values(full)
    if bad:
        raise CheckpointError(
            f"{path}: not writing a checkpoint holding values a safe load would refuse: {first(bad)}. "
            "Convert them to tensors or plain Python types."
        )
    atomic_torch_save(full, path)


def plain(obj: Any) -> Any:
    """Meta values as plain Python (tuples -> lists; anything exotic -> its ``repr``)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool, type(None))):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return repr(obj)
