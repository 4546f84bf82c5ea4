"""HRDA's pseudo-label validity margins ("plcrop v2", hrda_mic.md 2.3): the mask goes through the target
pipeline with the image (same resize rule, crop and flip draws), the reference's 1024x2048 canvas (Q17) vs
the image-sized option, padding, the batch key, worker-count independence and exact resume."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from dida.config import load_config
from dida.constants import IMG_MEAN, IMG_STD
from dida.data import CityscapesDataset, GTADataset, build_pseudo_margin_mask
from dida.data.loader import build_train_loader
from dida.data.transforms import REFERENCE_MARGIN_CANVAS, PseudoMarginMask, TrainPipeline, margin_mask
from dida.data.uda import SourceTargetDataset, collate_uda
from dida.errors import ConfigError, DataError

MARGINS = (30, 240, 30, 30)


def coordinate_image(height: int, width: int) -> np.ndarray:
    """BGR uint8 image whose blue channel is the column and green channel the row (both < 256)."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    img[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]
    return img


def decode(img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Columns and rows of the source image that each output pixel came from (normalised RGB [3, h, w])."""
    rgb = img.numpy() * np.asarray(IMG_STD)[:, None, None] + np.asarray(IMG_MEAN)[:, None, None]
    return np.rint(rgb[2]).astype(int), np.rint(rgb[1]).astype(int)


def reference_mask(size_hw: tuple[int, int]) -> np.ndarray:
    """The reference: ones on 1024x2048 with the margins zeroed, keep-ratio nearest-resized (mmcv/cv2)."""
    canvas = np.ones(REFERENCE_MARGIN_CANVAS, dtype=np.uint8)
    top, bottom, left, right = MARGINS
    canvas[:top], canvas[canvas.shape[0] - bottom:] = 0, 0
    canvas[:, :left], canvas[:, canvas.shape[1] - right:] = 0, 0
    return cv2.resize(canvas, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST)


def test_margin_mask_and_canvases():
    m = margin_mask(10, 12, (1, 3, 2, 4))
    assert m.dtype == np.uint8 and m.shape == (10, 12)
    assert m[1:7, 2:8].all() and m.sum() == 6 * 6
    assert PseudoMarginMask(margins=MARGINS, canvas="reference")(128, 256).shape == (1024, 2048)
    assert PseudoMarginMask(margins=MARGINS, canvas="image")(100, 300).shape == (100, 300)
    assert PseudoMarginMask(margins=MARGINS, canvas="reference").pad_value == 255  # Q17
    assert PseudoMarginMask(margins=MARGINS, canvas="image").pad_value == 0
    with pytest.raises(ValueError, match="four"):
        PseudoMarginMask(margins=(1, 2, 3), canvas="image")


@pytest.mark.parametrize("canvas", ["reference", "image"])
def test_mask_is_cropped_and_flipped_with_the_image(canvas):
    """A 256x128 coordinate image, no resize, 64x96 crops: the mask follows the crop box and the flip that
    the image content reveals, and the draws are those of the plain pipeline."""
    img = coordinate_image(128, 256)
    label = np.zeros((128, 256), dtype=np.uint8)
    pipe = TrainPipeline((256, 128), (64, 96), cat_max_ratio=1.0, flip_prob=0.5)
    margins = MARGINS if canvas == "reference" else (4, 30, 5, 3)
    maker = PseudoMarginMask(margins=margins, canvas=canvas)
    full = pipe.resize_mask(maker(128, 256))
    expected_full = reference_mask((128, 256)) if canvas == "reference" else margin_mask(128, 256, margins)
    assert np.array_equal(full, expected_full)
    flips = set()
    for seed in range(12):
        img_t, label_t, mask_t = pipe.random_part_masked(img, label, full, np.random.default_rng(seed),
                                                         pad_value=maker.pad_value)
        plain_img, plain_label = pipe(img, label, np.random.default_rng(seed))
        assert torch.equal(img_t, plain_img) and torch.equal(label_t, plain_label)  # the same draws
        assert mask_t.dtype == torch.uint8 and mask_t.shape == (64, 96)
        cols, rows = decode(img_t)
        flipped = cols[0, 0] > cols[0, -1]
        flips.add(bool(flipped))
        assert np.array_equal(mask_t.numpy(), full[rows, cols])  # pixel for pixel, wherever it came from
        y1, x1 = rows.min(), cols.min()
        box = full[y1:y1 + 64, x1:x1 + 96]
        assert np.array_equal(mask_t.numpy(), box[:, ::-1] if flipped else box)
    assert flips == {True, False}


def test_padding_fills_255_on_the_reference_canvas_and_0_on_the_image_one():
    img, label = coordinate_image(32, 64), np.zeros((32, 64), dtype=np.uint8)
    pipe = TrainPipeline((64, 32), (40, 64), flip_prob=0.0)
    for canvas, value in (("reference", 255), ("image", 0)):
        maker = PseudoMarginMask(margins=(0, 0, 0, 0), canvas=canvas)
        _, label_t, mask_t = pipe.random_part_masked(img, label, pipe.resize_mask(maker(32, 64)),
                                                     np.random.default_rng(0), pad_value=maker.pad_value)
        assert (mask_t[32:] == value).all() and (mask_t[:32] == 1).all() and (label_t[32:] == 255).all()


def _pair(gta_root, cityscapes_root, valid_mask, crop=(32, 48), target_scale=(128, 64)):
    return SourceTargetDataset(
        GTADataset(gta_root), CityscapesDataset(cityscapes_root, "train"),
        TrainPipeline((96, 64), crop, cat_max_ratio=0.75), TrainPipeline(target_scale, crop, cat_max_ratio=1.0),
        rcs=None, seed=0, valid_mask=valid_mask)


def test_dataset_delivers_the_mask_without_changing_the_draws(gta_root, cityscapes_root):
    plain = _pair(gta_root, cityscapes_root, None)
    masked = _pair(gta_root, cityscapes_root, PseudoMarginMask(margins=MARGINS, canvas="reference"))
    for k in range(4):
        a, b = plain[k], masked[k]
        assert set(b) - set(a) == {"valid_pseudo_mask"}
        assert all(torch.equal(a[key], b[key]) for key in a if isinstance(a[key], torch.Tensor))
        valid = b["valid_pseudo_mask"]
        assert valid.shape == (32, 48) and valid.dtype == torch.uint8
        # 128x64 Cityscapes at scale 128x64: the canvas is scaled by 1/16 (the geometry is checked above)
        assert set(valid.unique().tolist()) <= {0, 1}
    batch = collate_uda([masked[0], masked[1]])
    assert batch["valid_pseudo_mask"].shape == (2, 32, 48)
    assert "valid_pseudo_mask" not in collate_uda([plain[0], plain[1]])


def test_reference_canvas_refuses_images_of_another_aspect_ratio(gta_root, cityscapes_root):
    """Q17: on a 3:2 target the 1024x2048 canvas resizes to another size than the image: a clear error that
    names the option; the image-sized canvas works."""
    ds = _pair(gta_root, gta_root.parent / "cityscapes", PseudoMarginMask(margins=MARGINS, canvas="reference"))
    ds.target = GTADataset(gta_root)  # 96x64 images (3:2)
    with pytest.raises(DataError, match="pseudo_margins_canvas=image"):
        ds[0]
    ds.valid_mask = PseudoMarginMask(margins=(2, 10, 3, 3), canvas="image")
    assert ds[0]["valid_pseudo_mask"].shape == (32, 48)


def test_workers_and_resume_give_identical_masked_batches(gta_root, cityscapes_root):
    ds = _pair(gta_root, cityscapes_root, PseudoMarginMask(margins=MARGINS, canvas="reference"))
    serial = [b for _, b in zip(range(3), build_train_loader(ds, batch_size=2, num_workers=0, seed=0))]
    parallel = [b for _, b in zip(range(3), build_train_loader(ds, batch_size=2, num_workers=2, seed=0))]
    resumed = next(iter(build_train_loader(ds, batch_size=2, num_workers=0, start_iter=2)))
    for a, b in [*zip(serial, parallel), (serial[2], resumed)]:
        assert torch.equal(a["valid_pseudo_mask"], b["valid_pseudo_mask"])
        assert torch.equal(a["target_img"], b["target_img"]) and torch.equal(a["img"], b["img"])
    assert any((b["valid_pseudo_mask"] == 0).any() for b in serial)


def test_config_keys_builder_and_validation():
    cfg = load_config("gta2cs_mic_hrda")
    assert cfg.data.target.pseudo_margins == [30, 240, 30, 30]
    assert cfg.data.target.pseudo_margins_canvas == "reference"
    assert (cfg.uda.pseudo_weight_ignore_top, cfg.uda.pseudo_weight_ignore_bottom) == (0, 0)
    mask = build_pseudo_margin_mask(cfg.data.target)
    assert mask is not None and mask.margins == (30, 240, 30, 30) and mask.canvas == "reference"
    assert build_pseudo_margin_mask(load_config("gta2cs_daformer").data.target) is None
    # the reference asserts that the margins and the ignored rows are not combined
    with pytest.raises(ConfigError, match=r"data\.target\.pseudo_margins.*pseudo_weight_ignore_top"):
        load_config("gta2cs_mic_hrda", ["uda.pseudo_weight_ignore_top=15"])
    with pytest.raises(ConfigError, match=r"data\.source\.pseudo_margins"):
        load_config("gta2cs_mic_hrda", ["data.source.pseudo_margins=[1,1,1,1]"])
    with pytest.raises(ConfigError, match=r"data\.target\.pseudo_margins"):
        load_config("gta2cs_mic_hrda", ["data.target.pseudo_margins=[1,2,3]"])
    with pytest.raises(ConfigError, match=r"data\.target\.pseudo_margins_canvas"):
        load_config("gta2cs_mic_hrda", ["data.target.pseudo_margins_canvas=fixed"])
