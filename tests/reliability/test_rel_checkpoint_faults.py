"""Checkpoint faults in a training run: failed writes, pruning, and refused checkpoints on --resume.

Issue 9, items 2 and 3 at the engine level (the loader's own refusals are in tests/test_checkpoint.py;
the atomic-write unit tests in tests/engine/test_run_dir.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from rel_helpers import CreatesFile, read_jsonl, tiny_cfg

from dida.checkpoint import list_checkpoints, read_checkpoint, write_checkpoint
from dida.cli import main
from dida.engine.train import train
from dida.errors import CheckpointError


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in os.listdir(folder) if ".tmp" in p]


# ------------------------------------------------------------------------- item 2: failed writes


def test_disk_full_during_a_run_keeps_the_previous_checkpoint(rel_data, tmp_path, monkeypatch):
    """The second checkpoint's write fails half-way: the run stops with a CheckpointError naming the
    intact previous file; iter_2.pth / latest.pth still load and --resume continues from them."""
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # iteration 4's checkpoint
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"iter_4\.pth: writing the checkpoint failed.*No space") as e:
        train(tiny_cfg(rel_data, run, "train.max_iters=6", "train.keep_last=1"))
    assert "iter_2.pth is intact" in str(e.value) and "--resume" in str(e.value)
    monkeypatch.undo()
    assert [i for i, _ in list_checkpoints(run)] == [2]
    assert read_checkpoint(run / "latest.pth")["iteration"] == 2
    assert _no_temp_files(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert read_checkpoint(run / "latest.pth")["iteration"] == 6
    assert [r["iter"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_read_only_filesystem_is_reported(tmp_path, monkeypatch):
    """EROFS when the temporary file is created (what a read-only mount gives, even to root)."""
    write_checkpoint(tmp_path, 2, {"iteration": 2}, keep_last=1)

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    with pytest.raises(OSError, match="Read-only"):
        write_checkpoint(tmp_path, 4, {"iteration": 4}, keep_last=1)
    monkeypatch.undo()
    assert [i for i, _ in list_checkpoints(tmp_path)] == [2]
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["iteration"] == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_reported(tmp_path):
    write_checkpoint(tmp_path, 2, {"iteration": 2}, keep_last=1)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            write_checkpoint(tmp_path, 4, {"iteration": 4}, keep_last=1)
    finally:
        tmp_path.chmod(0o755)
    assert [i for i, _ in list_checkpoints(tmp_path)] == [2]
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["iteration"] == 2


def test_keep_last_prunes_only_complete_checkpoints(tmp_path):
    """Leftovers of killed writes (temporary names) are neither counted nor taken for checkpoints."""
    leftovers = [".iter_5.abc123.tmp.pth", ".latest.xyz.tmp.pth", "iter_7.pth.partial", "iter_x.pth"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    for it in (2, 4, 6, 8):
        write_checkpoint(tmp_path, it, {"iteration": it}, keep_last=2)
    assert [i for i, _ in list_checkpoints(tmp_path)] == [6, 8]
    assert all((tmp_path / name).exists() for name in leftovers)  # never deleted as if they were old ones
    for _, p in list_checkpoints(tmp_path):
        torch.load(p, weights_only=True)
    # latest.pth is a separate name: pruning iter_6 later leaves it valid
    write_checkpoint(tmp_path, 10, {"iteration": 10}, keep_last=1)
    assert [i for i, _ in list_checkpoints(tmp_path)] == [10]
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["iteration"] == 10


def test_resume_drops_log_rows_written_after_the_checkpoint(rel_data, tmp_path):
    """kill -9 between logging iteration 3 and writing its checkpoint: the resumed run logs 3 once."""
    full = train(tiny_cfg(rel_data, tmp_path / "full", "train.checkpoint_interval=2"))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "config.yaml", part)
    shutil.copy(full / "iter_2.pth", part / "latest.pth")
    lines = (full / "metrics.jsonl").read_text().splitlines(keepends=True)
    (part / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][:10])  # row 3, and half of row 4
    assert main(["train", "--resume", str(part)]) == 0
    rows = read_jsonl(part / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]


# ------------------------------------------------------------------- item 3: refused on --resume


def _interrupted_run(rel_data: Path, tmp_path: Path) -> Path:
    run = train(tiny_cfg(rel_data, tmp_path / "run", "train.max_iters=2", "train.checkpoint_interval=1"))
    return run


def test_resume_from_a_truncated_checkpoint_is_refused(rel_data, tmp_path, capsys):
    run = _interrupted_run(rel_data, tmp_path)
    data = (run / "iter_2.pth").read_bytes()
    (run / "latest.pth").unlink()
    (run / "latest.pth").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.max_iters=4"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'latest.pth'}: truncated or not a checkpoint" in err and "Traceback" not in err
    assert not (run / "iter_3.pth").exists()


def test_resume_from_a_code_executing_pickle_is_refused(rel_data, tmp_path, capsys):
    run = _interrupted_run(rel_data, tmp_path)
    victim = tmp_path / "created_by_unpickling"
    ckpt = read_checkpoint(run / "latest.pth")
    ckpt["meta"]["payload"] = CreatesFile(victim)
    (run / "latest.pth").unlink()
    torch.save(ckpt, run / "latest.pth")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.max_iters=4"]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "open" in err and "arbitrary code" in err
    assert not victim.exists()
    assert not (run / "iter_3.pth").exists()


def test_resume_with_another_architecture_is_refused(rel_data, tmp_path, capsys):
    run = _interrupted_run(rel_data, tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "model.decoder_channels=32", "train.max_iters=4"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'latest.pth'}: does not match this run's model" in err
    assert "size mismatch" in err and "Traceback" not in err
    assert not (run / "iter_3.pth").exists()
