"""Run-directory mechanics: atomic checkpoints, latest.pth, pruning, the lock."""

from __future__ import annotations

import os

import pytest
import torch

from dida.checkpoint import list_checkpoints, resume_checkpoint, save_checkpoint, write_checkpoint
from dida.engine.train import RunLock
from dida.errors import DidaError


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for it in (2, 4, 6):
        write_checkpoint(tmp_path, it, {"iteration": it, "w": torch.full((3,), float(it))}, keep_last=2)
    assert [i for i, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert torch.load(tmp_path / "latest.pth")["iteration"] == 6
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, 2, {"iteration": 2}, keep_last=None)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(tmp_path, 4, {"iteration": 4}, keep_last=1)
    monkeypatch.undo()
    assert [i for i, _ in list_checkpoints(tmp_path)] == [2]
    assert torch.load(tmp_path / "latest.pth")["iteration"] == 2
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert resume_checkpoint(tmp_path) == tmp_path / "latest.pth"  # nothing saved: loading it says so
    save_checkpoint(tmp_path / "iter_1.pth", {"iteration": 1})  # killed before the first link
    assert resume_checkpoint(tmp_path) == tmp_path / "iter_1.pth"
    write_checkpoint(tmp_path, 2, {"iteration": 2}, keep_last=None)
    assert resume_checkpoint(tmp_path) == tmp_path / "latest.pth"  # the normal case
    save_checkpoint(tmp_path / "iter_3.pth", {"iteration": 3})  # killed between the write and the link
    assert resume_checkpoint(tmp_path) == tmp_path / "iter_3.pth"
    (tmp_path / "latest.pth").unlink()
    save_checkpoint(tmp_path / "latest.pth", {"iteration": 3})  # a copy (no hard links), up to date
    assert resume_checkpoint(tmp_path) == tmp_path / "latest.pth"
    (tmp_path / "latest.pth").write_bytes(b"torn")  # damaged after the fact: loading it refuses it, with the reason
    assert resume_checkpoint(tmp_path) == tmp_path / "latest.pth"


def test_second_run_on_the_same_directory_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(DidaError, match="another training run"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass
