"""``dida infer`` on a folder (one corrupt file), the overlay formula, and the colour helpers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dida.cli import main
from dida.constants import PALETTE
from dida.engine.predict import list_images
from dida.visualize import colorize, overlay, palette_lut


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A dida checkpoint of the tiny 4-class model, with its config inside."""
    from dida.checkpoint import save_checkpoint
    from dida.config import load_config, to_yaml
    from dida.models import build_model

    tmp = tmp_path_factory.mktemp("infer_ckpt")
    cfg_path = tmp / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": dict(
        backbone="mit_b0", num_classes=4, embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 1, 1],
        depths=[1, 1, 1, 1], decoder_channels=16), "uda": {"feature_distance": {"classes": [1, 2]}}}))
    cfg = load_config(str(cfg_path))
    gen = torch.Generator().manual_seed(0)
    model = build_model(cfg.model, generator=gen)
    with torch.no_grad():
        model.decode_head.conv_seg.weight.normal_(0.0, 3.0, generator=gen)
    path = tmp / "tiny.pth"
    save_checkpoint(path, {"model": model.state_dict(), "ema_model": None, "iteration": 0,
                           "config": to_yaml(cfg)})
    # The same weights without a config: the model must then come from --config.
    torch.save(model.state_dict(), tmp / "plain.pth")
    return path


def _images(folder: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    imgs = {"a.png": rng.integers(0, 256, (40, 70, 3), dtype=np.uint8),
            "b.jpg": rng.integers(0, 256, (33, 51, 3), dtype=np.uint8)}
    for name, img in imgs.items():
        cv2.imwrite(str(folder / name), img)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (folder / "notes.txt").write_text("not an image")
    return imgs


def test_infer_folder_skips_corrupt_file(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    _images(folder)
    out = tmp_path / "out"
    rc = main(["infer", str(checkpoint), str(folder), "--out", str(out), "--img-scale", "64", "32",
               "--device", "cpu", "--opacity", "0.3"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "1 skipped" in captured.out and "2 image(s)" in captured.out
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_labelTrainIds.png", "a_pred.png", "b_labelTrainIds.png", "b_pred.png"]

    for stem in ("a", "b"):
        src = cv2.imread(str(next(folder.glob(f"{stem}.*"))), cv2.IMREAD_COLOR)  # decoded as dida does
        label = np.asarray(Image.open(out / f"{stem}_labelTrainIds.png"))
        assert label.shape == src.shape[:2] and label.max() < 4
        pred = cv2.imread(str(out / f"{stem}_pred.png"), cv2.IMREAD_COLOR)
        colour_bgr = np.asarray(PALETTE, dtype=np.float64)[label][..., ::-1]
        expected = (src.astype(np.float64) * 0.7 + colour_bgr * 0.3).astype(np.uint8)
        np.testing.assert_array_equal(pred, expected)


def test_infer_single_file_with_config_and_all_corrupt(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    imgs = _images(folder)
    cfg = checkpoint.parent / "tiny.yaml"
    out = tmp_path / "out1"
    rc = main(["infer", str(checkpoint.parent / "plain.pth"), str(folder / "a.png"), "--config", str(cfg),
               "--out", str(out), "--img-scale", "64", "32", "--device", "cpu"])
    assert rc == 0
    assert np.asarray(Image.open(out / "a_labelTrainIds.png")).shape == imgs["a.png"].shape[:2]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["infer", str(checkpoint), str(bad), "--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    assert "x.png" in capsys.readouterr().err
    assert main(["infer", str(checkpoint), str(tmp_path / "missing"), "--device", "cpu"]) == 2


def test_list_images_sorted_recursive_and_skips_outputs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "a_pred.png", "a_labelTrainIds.png", "x.txt", "sub/c.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.JPG", "b.png", "c.png"]
    excluded = list_images(tmp_path, recursive=True, exclude=tmp_path / "sub")
    assert [p.name for p in excluded] == ["a.JPG", "b.png"]


def test_colorize_and_overlay():
    label = np.array([[0, 1], [18, 255]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == PALETTE[0] and tuple(rgb[1, 0]) == PALETTE[18]
    assert tuple(rgb[1, 1]) == (0, 0, 0)
    np.testing.assert_array_equal(colorize(torch.from_numpy(label)), rgb)
    img = np.full((2, 2, 3), 101, dtype=np.uint8)
    blended = overlay(img, label, opacity=0.5)
    assert tuple(blended[0, 0]) == tuple(int(101 * 0.5 + c * 0.5) for c in PALETTE[0][::-1])
    np.testing.assert_array_equal(overlay(img, label, opacity=0.0), img)
    np.testing.assert_array_equal(overlay(img, label, opacity=1.0), rgb[..., ::-1])
    lut = palette_lut(25)  # extra classes get fixed colours
    assert (lut[19:25].sum(axis=1) > 0).all() and tuple(lut[255]) == (0, 0, 0)
