"""The Python entry point: ``dida.load_model`` on the checkpoints dida reads, and image-level prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dida
from dida.config import load_config
from dida.data.transforms import load_image
from dida.engine.train import train


@pytest.fixture(scope="module")
def run_dir(fake_data, tmp_path_factory) -> Path:
    data = fake_data / "tiny_cpu"
    cfg = load_config("tiny_cpu", [f"run.dir={tmp_path_factory.mktemp('api') / 'run'}",
                                   f"data.source.root={data / 'gta'}", f"data.target.root={data / 'cs'}",
                                   f"data.val.root={data / 'cs'}", "train.max_iters=1"])
    return train(cfg)


def _an_image(fake_data) -> Path:
    return sorted((fake_data / "tiny_cpu" / "cs" / "leftImg8bit" / "val").rglob("*.png"))[0]


def test_load_model_takes_the_settings_from_the_run(run_dir, fake_data):
    model = dida.load_model(run_dir / "latest.pth", device="cpu")
    assert isinstance(model, dida.Predictor) and not model.model.training
    assert model.img_scale == (128, 64) and model.settings == "settings from the checkpoint's configuration"
    assert len(model.class_names) == 19 and model.class_names[0] == "road"
    path = _an_image(fake_data)
    labels = model.predict(path)
    rgb = load_image(path)[..., ::-1].copy()
    assert labels.dtype == np.uint8 and labels.shape == rgb.shape[:2] and labels.max() < 19
    # a file and the same pixels as an RGB array give the same prediction
    assert np.array_equal(model.predict(rgb), labels)
    # it is the test pipeline's prediction: normalisation and the test scale applied, as dida test does
    from dida.engine.predict import predict_image

    expected = predict_image(model.model, load_image(path), img_scale=(128, 64))
    assert np.array_equal(labels, expected)
    ov = model.overlay(rgb, labels)
    assert ov.shape == rgb.shape and ov.dtype == np.uint8 and not np.array_equal(ov, rgb)


def test_the_teacher_and_a_weights_only_checkpoint(run_dir, tmp_path, fake_data):
    teacher = dida.load_model(run_dir / "latest.pth", which="ema_model", device="cpu")
    ckpt = torch.load(run_dir / "latest.pth", weights_only=True)
    torch.save({"state_dict": ckpt["model"]}, tmp_path / "weights.pth")  # no configuration inside
    bare = dida.load_model(tmp_path / "weights.pth", device="cpu")
    assert "assumed" in bare.settings and "data.val.img_scale" in bare.settings
    assert "attention heads" in bare.settings and "model.num_heads" in bare.settings  # not in any weight shape
    assert bare.img_scale == (1024, 512)  # the matching preset's test scale, said to be assumed
    for (name, a), b in zip(teacher.model.state_dict().items(), bare.model.state_dict().values()):
        assert a.shape == b.shape, name


def test_bad_inputs_give_one_clear_error(run_dir, tmp_path):
    from dida.errors import CheckpointError, DataError

    model = dida.load_model(run_dir / "latest.pth", device="cpu")
    with pytest.raises(DataError, match=r"RGB uint8 array \[H, W, 3\]"):
        model.predict(np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="not found"):
        model.predict(tmp_path / "missing.png")
    with pytest.raises(CheckpointError, match="no such file"):
        dida.load_model(tmp_path / "missing.pth")


def test_bf16_inference_runs_the_model_in_bf16(run_dir, fake_data):
    fp32 = dida.load_model(run_dir / "latest.pth", device="cpu")
    bf16 = dida.load_model(run_dir / "latest.pth", device="cpu", amp="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    path = _an_image(fake_data)
    a, b = fp32.predict(path), bf16.predict(path)
    assert a.shape == b.shape and (a == b).mean() > 0.9  # bf16 rounding flips only near-ties
