"""Data faults during a training run (issue 9, item 4).

The faults are injected *between iterations*: a patched ``SelfTrainingStep.__call__`` damages the data
after iteration ``k``'s step, so the next batch (num_workers=0: loaded in the main process, no
prefetch) meets it. RCS is off so that the source image is drawn uniformly and the damaged file is the
one the next batch needs (worked out beforehand from the dataset's per-sample seeds).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from rel_helpers import read_jsonl, tiny_cfg

from dida.checkpoint import read_checkpoint
from dida.data import build_uda_datasets
from dida.engine.train import train
from dida.errors import DataError


def _after_step(monkeypatch, at: int, action: Callable[[], None]) -> None:
    from dida.uda import step as step_mod

    original = step_mod.SelfTrainingStep.__call__

    def patched(self, batch, step, *args, **kwargs):
        out = original(self, batch, step, *args, **kwargs)
        if step == at:
            action()
        return out

    monkeypatch.setattr(step_mod.SelfTrainingStep, "__call__", patched)


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _source_file_of_iteration(cfg, it: int) -> str:
    train_set, _ = build_uda_datasets(cfg.data, seed=cfg.run.seed)
    return train_set[it * cfg.data.batch_size]["source_file"]


def test_corrupt_image_mid_run_is_logged_and_replaced(rel_data_copy, tmp_path, monkeypatch, capfd):
    cfg = tiny_cfg(rel_data_copy, tmp_path / "run", "data.rcs.enabled=false", "train.max_iters=4")
    victim = _source_file_of_iteration(cfg, 2)
    _after_step(monkeypatch, 1, lambda: _truncate(victim))
    run = train(cfg)
    err = capfd.readouterr().err
    assert f"warning: skipped unreadable sample(s) {victim} (replaced by other samples" in err
    assert err.count("warning: skipped unreadable") == 1  # each bad file is reported once
    ckpt = read_checkpoint(run / "latest.pth")
    assert ckpt["iteration"] == 4  # the run went on with another sample
    assert ckpt["meta"]["bad_files"] == [victim]
    assert [r["iter"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_too_many_bad_samples_stop_with_the_list_and_a_checkpoint(rel_data_copy, tmp_path, monkeypatch):
    cfg = tiny_cfg(rel_data_copy, tmp_path / "run", "data.rcs.enabled=false", "train.max_iters=4",
                   "data.max_bad_samples=0", "train.checkpoint_interval=0")
    victim = _source_file_of_iteration(cfg, 2)
    _after_step(monkeypatch, 1, lambda: _truncate(victim))
    with pytest.raises(DataError, match="data.max_bad_samples=0") as e:
        train(cfg)
    msg = str(e.value)
    assert "training stopped at iteration 2" in msg and victim in msg
    ckpt = read_checkpoint(tmp_path / "run" / "latest.pth")
    assert ckpt["iteration"] == 2 and ckpt["meta"]["bad_files"] == [victim]


@pytest.mark.parametrize("which", ["target", "source"])
def test_dataset_folder_vanishing_mid_run_stops_with_a_clear_error_and_a_checkpoint(
        rel_data_copy, tmp_path, monkeypatch, which):
    folder = (rel_data_copy / "cs" / "leftImg8bit" / "train" if which == "target"
              else rel_data_copy / "gta" / "images")
    cfg = tiny_cfg(rel_data_copy, tmp_path / "run", "train.max_iters=6", "train.checkpoint_interval=0")
    _after_step(monkeypatch, 2, lambda: shutil.rmtree(folder))
    with pytest.raises(DataError) as e:
        train(cfg)
    msg = str(e.value)
    assert f"{which} samples in a row could not be read" in msg
    assert str(folder) in msg and "not found" in msg  # the reason, naming a file in the vanished folder
    assert "training stopped at iteration 3" in msg and "latest.pth" in msg and "--resume" in msg
    assert read_checkpoint(tmp_path / "run" / "latest.pth")["iteration"] == 3
