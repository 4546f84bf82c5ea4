"""The training state of a run: written by one function, restored by one function.

A dida checkpoint (``format: dida``, ``version: 2``) holds ``model`` (the student), ``ema_model`` (the
teacher, or None), ``terms`` (each training term's state, e.g. DIDA's instance bank or the feature
distance's frozen ImageNet model, by term name), ``optimizer``, ``scaler``, ``iteration``, ``config``
(the resolved YAML) and ``meta``. Files are ``run_dir/iter_N.pth``, with ``latest.pth`` a hard link to
the newest; every write is atomic and checked by ``save_checkpoint`` (only values a safe load accepts).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dida.checkpoint.io import FORMAT_VERSION, read_checkpoint, save_checkpoint
from dida.errors import CheckpointError
from dida.io import atomic_path

__all__ = ["CHECKPOINT_RE", "TrainingState", "link_checkpoint", "list_checkpoints", "restore_training_state",
           "resume_checkpoint", "training_state_dict", "write_checkpoint"]

CHECKPOINT_RE = re.compile(r"^iter_(\d+)\.pth$")


@dataclass
class TrainingState:
    """Everything a run needs to continue exactly: models, term states, optimizer, iteration.

    Attributes:
        student: the model being trained.
        teacher: the EMA teacher module (its ``model`` is saved as ``ema_model``), or None.
        terms: the training terms by name (``nn.Module``s; their ``state_dict`` is saved).
        optimizer: the optimizer.
        scaler: the fp16 ``GradScaler`` or None.
        iteration: the number of completed iterations.
        meta: plain values (e.g. ``bad_files``) carried across resumes.
    """

    student: nn.Module
    teacher: nn.Module | None
    terms: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: Any = None
    iteration: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``iter_N.pth`` files, oldest first (temporary files never match)."""
    out = []
    for p in Path(run_dir).glob("iter_*.pth"):
        m = CHECKPOINT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a resumed run continues from: the newest complete one.

    That is ``latest.pth``, except after a kill between writing ``iter_N.pth`` and pointing ``latest.pth`` at
    it; then ``iter_N.pth`` itself (nothing computed is lost). Reads nothing but ``latest.pth``'s iteration,
    and that only where it is not a hard link to one of the ``iter_N.pth`` files. A ``latest.pth`` damaged
    after it was written is returned as is, so that the resume refuses it with the reason rather than
    quietly continuing from another file.

    Args:
        run_dir: the run directory.

    Returns:
        ``run_dir/latest.pth`` or the newest ``iter_N.pth`` (``latest.pth`` when neither exists; loading it
        then reports that the run never saved a checkpoint).
    """
    latest = Path(run_dir) / "latest.pth"
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return latest
    newest_it, newest = ckpts[-1]
    if not latest.exists():
        return newest
    linked = [it for it, p in ckpts if os.path.samefile(p, latest)]
    if linked:
        latest_it = linked[0]
    else:  # a copy (no hard links on this file system), or a file whose iter_N.pth was pruned
        try:
            latest_it = int(read_checkpoint(latest).get("iteration", -1))
        except CheckpointError:  # damaged or unsafe after it was written (writes are atomic): loading it says so
            return latest
    return newest if newest_it > latest_it else latest


def training_state_dict(state: TrainingState, config_yaml: str) -> dict[str, Any]:
    """The checkpoint contents of ``state`` (see the module docstring)."""
    from dida import __version__

    teacher = getattr(state.teacher, "model", state.teacher)
    return {
        "model": state.student.state_dict(),
        "ema_model": teacher.state_dict() if teacher is not None else None,
        "terms": {name: term.state_dict() for name, term in state.terms.items()},
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "iteration": int(state.iteration),
        "config": config_yaml,
        "meta": {"dida_version": __version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **state.meta},
    }


def write_checkpoint(run_dir: Path, iteration: int, state: Mapping[str, Any], keep_last: int | None = None) -> Path:
    """Write ``iter_{iteration}.pth`` atomically, point ``latest.pth`` at it, prune old ones.

    ``state`` goes through ``save_checkpoint`` (``format``/``version`` added; values a safe load would refuse
    are an error before anything is written).

    Args:
        run_dir: the run directory.
        iteration: the number of completed iterations (the file name).
        state: the checkpoint contents (normally ``training_state_dict(...)``).
        keep_last: keep only this many ``iter_N.pth`` files (None: all).

    Returns:
        The path of the new checkpoint.
    """
    path = Path(run_dir) / f"iter_{int(iteration)}.pth"
    save_checkpoint(path, state)
    link_checkpoint(path, Path(run_dir) / "latest.pth")
    if keep_last is not None:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def link_checkpoint(path: Path, name: Path) -> None:
    """Point ``name`` (e.g. ``latest.pth``, ``best.pth``) at ``path`` atomically: a hard link (no second copy on
    disk; it survives the pruning of ``path``), or a copy where the file system has no hard links."""
    with atomic_path(name) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)


def restore_training_state(path: Path, state: TrainingState) -> dict[str, Any]:
    """Load ``path`` (a checkpoint written by ``write_training_checkpoint``) into ``state``.

    Sets ``state.iteration`` and ``state.meta``; returns the checkpoint's ``meta``.

    Raises:
        CheckpointError: the file is missing, unreadable, of an older format, or written for another model,
            optimizer or set of terms.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint to resume from (the run never saved one).")
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != "dida" or int(ckpt.get("version", 0)) < FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by an older dida (checkpoint format {ckpt.get('version')}, this version needs "
            f"{FORMAT_VERSION}); such a run cannot be continued. `dida test` and `dida infer` still read it.")
    try:
        state.student.load_state_dict(ckpt["model"])
        teacher = getattr(state.teacher, "model", state.teacher)
        if teacher is not None and ckpt.get("ema_model") is not None:
            teacher.load_state_dict(ckpt["ema_model"])
        saved_terms = ckpt.get("terms") or {}
        if set(saved_terms) != set(state.terms):
            raise ValueError(f"the checkpoint has terms {sorted(saved_terms)}, the run {sorted(state.terms)}")
        for name, term in state.terms.items():
            term.load_state_dict(saved_terms[name])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.scaler is not None and ckpt.get("scaler"):
            state.scaler.load_state_dict(ckpt["scaler"])
        state.iteration = int(ckpt["iteration"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first_lines = str(e).strip().splitlines()[:4]
        raise CheckpointError(
            f"{path}: does not match this run's model/optimizer ({type(e).__name__}: "
            f"{' '.join(line.strip() for line in first_lines)[:400]}). It was written by another "
            "configuration: resume without model overrides, or start a new run.dir."
        ) from None
    meta = dict(ckpt.get("meta") or {})
    state.meta.update({k: v for k, v in meta.items() if k == "bad_files"})
    return meta
