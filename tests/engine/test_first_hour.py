"""A newcomer's first hour: the run's scale reaches `dida infer` and `dida bank build`, the run directory holds a
readable train.log and only the configured checkpoints, and a finished run says so when resumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dida.cli import main
from dida.config import load_config
from dida.engine.train import train


def _cfg(data: Path, run_dir: Path, *extra: str):
    return load_config("tiny_cpu", [f"run.dir={run_dir}", f"data.source.root={data / 'gta'}",
                                    f"data.target.root={data / 'cs'}", f"data.val.root={data / 'cs'}", *extra])


@pytest.fixture(scope="module")
def run_dir(fake_data, tmp_path_factory) -> Path:
    # tiny_cpu trains at 128x72 (source) and tests at 128x64 (val): neither is a command default
    return train(_cfg(fake_data / "tiny_cpu", tmp_path_factory.mktemp("first_hour") / "run",
                      "train.max_iters=3", "train.checkpoint_interval=1", "train.eval_interval=2",
                      "train.keep_last=1", "train.log_interval=1"))


def test_the_run_directory_holds_a_readable_log_and_only_the_configured_checkpoints(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"iter_3.pth", "latest.pth", "best.pth", "train.log", "metrics.jsonl", "eval.jsonl"} <= names
    assert not {"iter_1.pth", "iter_2.pth"} & names  # keep_last=1 pruned them; best.pth stays a file of its own
    log = (run_dir / "train.log").read_text()
    for expected in ("dida 0.1.0, torch", "run directory:", "model: encoder_decoder on mit_b0", "method: self-training",
                     "schedule: 3 iterations", "data: source gta", "[iter 1/3]", "[iter 3/3]", "s/it data=",
                     "mem=", "eta=", "mIoU", "road", "Finished at iteration 3", "Best mIoU"):
        assert expected in log, expected
    # the per-class table of each evaluation (iterations 2 and 3)
    assert log.count("aAcc:") == 2


def test_resuming_a_finished_run_says_so(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "already finished its 3 iterations; nothing to do" in out and "Best mIoU" in out


def test_infer_uses_the_models_test_scale(run_dir, fake_data, tmp_path, monkeypatch, capsys):
    from dida.commands import infer

    seen = []
    real = infer.predict_image
    monkeypatch.setattr(infer, "predict_image", lambda *a, **k: seen.append(k) or real(*a, **k))
    image = sorted((fake_data / "tiny_cpu" / "cs" / "leftImg8bit" / "val").rglob("*.png"))[0]
    assert main(["infer", str(run_dir / "latest.pth"), str(image), "--out", str(tmp_path / "p")]) == 0
    assert seen and seen[0]["img_scale"] == (128, 64) and seen[0]["mode"] == "whole"
    assert "test scale 128x64" in capsys.readouterr().err
    # a flag overrides the stored setting
    seen.clear()
    assert main(["infer", str(run_dir / "latest.pth"), str(image), "--out", str(tmp_path / "q"),
                 "--img-scale", "96", "48"]) == 0
    assert seen[0]["img_scale"] == (96, 48)


def test_bank_build_uses_the_models_training_scale_and_data(run_dir, tmp_path, monkeypatch, capsys):
    from dida.commands import bank

    seen = {}
    real = bank.build_bank
    monkeypatch.setattr(bank, "build_bank", lambda *a, **k: seen.update(k) or real(*a, **k))
    assert main(["bank", "build", str(run_dir / "latest.pth"), "--size", "4", "--out", str(tmp_path / "b"),
                 "--max-images", "2", "--device", "cpu"]) == 0
    assert seen["img_scale"] == (128, 72)  # the run's data.source.img_scale, with its source data
    err = capsys.readouterr().err
    assert "gta images in" in err and "the model's training scale" in err
    assert (tmp_path / "b" / "f_buffer_s.npz").is_file()
