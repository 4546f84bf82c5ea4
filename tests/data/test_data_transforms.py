"""Pipelines: mmseg/mmcv resize, crop, flip, normalise and pad numerics; loading errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from fake_datasets import truncate_file
from PIL import Image

from dida.constants import IMG_MEAN, IMG_STD
from dida.data import preprocess_test_image
from dida.data.transforms import TestPipeline as _TestPipeline  # not collected by pytest
from dida.data.transforms import (
    TrainPipeline,
    load_image,
    load_label,
    normalize,
    random_crop_box,
    rescale_size,
    resize_keep_ratio,
)
from dida.errors import DataError


@pytest.mark.parametrize(
    "size, scale, expected",
    [
        ((1914, 1052), (1280, 720), (1280, 704)),  # GTA
        ((1914, 1054), (1280, 720), (1280, 705)),
        ((2048, 1024), (1024, 512), (1024, 512)),  # Cityscapes
        ((1280, 760), (1280, 760), (1280, 760)),  # SYNTHIA: factor 1
        ((2048, 1024), (512, 1024), (1024, 512)),  # (long, short) order does not matter
        ((600, 800), (1024, 512), (512, 683)),  # portrait
    ],
)
def test_rescale_size(size, scale, expected):
    assert rescale_size(*size, scale) == expected


def test_resize_is_opencv_on_uint8():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (105, 191, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (105, 191), dtype=np.uint8)
    out = resize_keep_ratio(img, (128, 72))
    assert out.dtype == np.uint8 and out.shape == (70, 128, 3)
    np.testing.assert_array_equal(out, cv2.resize(img, (128, 70), interpolation=cv2.INTER_LINEAR))
    out_label = resize_keep_ratio(label, (128, 72), "nearest")
    np.testing.assert_array_equal(out_label, cv2.resize(label, (128, 70), interpolation=cv2.INTER_NEAREST))
    assert set(np.unique(out_label)) <= set(np.unique(label))


def test_normalize_matches_mmcv_formula():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    original = img.copy()
    out = normalize(img)
    np.testing.assert_array_equal(img, original)  # input untouched
    assert out.dtype == np.float32 and out.shape == (9, 13, 3)
    # mmcv imnormalize: float32 copy, BGR->RGB, cv2.subtract(float64 mean), cv2.multiply(1 / float64 std)
    ref = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_BGR2RGB)
    ref = cv2.multiply(cv2.subtract(ref, np.float64(IMG_MEAN).reshape(1, -1)),
                       (1 / np.float64(IMG_STD)).reshape(1, -1))
    np.testing.assert_array_equal(out, ref)
    rgb = img[:, :, ::-1].astype(np.float64)
    np.testing.assert_allclose(out, (rgb - IMG_MEAN) / IMG_STD, atol=1e-5)


def test_crop_without_cat_max_ratio_is_one_draw():
    label = np.zeros((50, 80), np.uint8)
    rng = np.random.default_rng(3)
    y1, y2, x1, x2 = random_crop_box(label, (20, 30), 1.0, rng)
    check = np.random.default_rng(3)
    assert (y1, x1) == (check.integers(0, 31), check.integers(0, 51))
    assert (y2 - y1, x2 - x1) == (20, 30)
    assert rng.random() == check.random()  # exactly two draws were consumed


def test_crop_cat_max_ratio_gives_up_after_ten_checks():
    label = np.zeros((50, 80), np.uint8)  # one class everywhere: every check fails
    rng = np.random.default_rng(4)
    box = random_crop_box(label, (20, 30), 0.75, rng)
    check = np.random.default_rng(4)
    draws = [(int(check.integers(0, 31)), int(check.integers(0, 51))) for _ in range(11)]
    assert (box[0], box[2]) == draws[-1]
    assert rng.random() == check.random()


def test_crop_cat_max_ratio_redraws_until_acceptable():
    # 10 x 40 label: class 1 in columns 0..4, class 2 elsewhere; a 10 x 10 crop at offset x is acceptable
    # (max share < 0.75) only for x <= 2, i.e. for 3 of the 31 possible offsets.
    label = np.full((10, 40), 2, np.uint8)
    label[:, :5] = 1
    label[0, :] = 255  # ignored pixels do not count
    accepted = 0
    for seed in range(40):
        box = random_crop_box(label, (10, 10), 0.75, np.random.default_rng(seed))
        check = np.random.default_rng(seed)
        for attempt in range(11):  # first draw + up to 10 redraws; the last one is not checked
            y, x = int(check.integers(0, 1)), int(check.integers(0, 31))
            if x <= 2:
                accepted += 1
                break
        assert box == (y, y + 10, x, x + 10)
    assert 0 < accepted < 40


def test_crop_ignores_255_in_the_ratio():
    label = np.full((30, 30), 255, np.uint8)
    label[0, 0] = 1  # only one non-ignore class anywhere: never acceptable
    rng = np.random.default_rng(0)
    random_crop_box(label, (30, 30), 0.75, rng)  # margin 0: still 11 draws of (0, 0)
    check = np.random.default_rng(0)
    [check.integers(0, 1) for _ in range(22)]
    assert rng.random() == check.random()


def make_pair(h=60, w=100, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.repeat(np.arange(w, dtype=np.uint8)[None] // 10, h, 0)
    label[:5] = 255
    return img, label


def test_train_pipeline_outputs_and_determinism():
    img, label = make_pair()
    pipe = TrainPipeline((80, 40), (24, 32), cat_max_ratio=0.75, flip_prob=0.5)
    out_img, out_label = pipe(img, label, np.random.default_rng(7))
    assert out_img.dtype == torch.float32 and out_img.shape == (3, 24, 32)
    assert out_label.dtype == torch.int64 and out_label.shape == (24, 32)
    assert out_img.is_contiguous() and out_label.is_contiguous()
    assert set(out_label.unique().tolist()) <= set(range(10)) | {255}
    lo = (0 - max(IMG_MEAN)) / min(IMG_STD)
    hi = (255 - min(IMG_MEAN)) / min(IMG_STD)
    assert lo <= out_img.min() and out_img.max() <= hi
    again = pipe(img, label, np.random.default_rng(7))
    assert torch.equal(out_img, again[0]) and torch.equal(out_label, again[1])
    outs = {pipe(img, label, np.random.default_rng(s))[1].sum().item() for s in range(10)}
    assert len(outs) > 1


def test_train_pipeline_is_resize_crop_flip_normalize():
    img, label = make_pair(seed=1)
    for flip_prob, flipped in ((0.0, False), (1.0, True)):
        pipe = TrainPipeline((80, 48), (24, 32), cat_max_ratio=1.0, flip_prob=flip_prob)
        out_img, out_label = pipe(img, label, np.random.default_rng(2))
        rng = np.random.default_rng(2)
        r_img = cv2.resize(img, (80, 48), interpolation=cv2.INTER_LINEAR)
        r_label = cv2.resize(label, (80, 48), interpolation=cv2.INTER_NEAREST)
        y, x = rng.integers(0, 48 - 24 + 1), rng.integers(0, 80 - 32 + 1)
        c_img, c_label = r_img[y:y + 24, x:x + 32], r_label[y:y + 24, x:x + 32]
        if flipped:
            c_img, c_label = c_img[:, ::-1], c_label[:, ::-1]
        np.testing.assert_array_equal(out_label.numpy(), c_label)
        expected = normalize(np.ascontiguousarray(c_img)).transpose(2, 0, 1)
        np.testing.assert_array_equal(out_img.numpy(), expected)


def test_train_pipeline_pads_bottom_right():
    img, label = make_pair(h=20, w=30)
    pipe = TrainPipeline((30, 20), (32, 40), flip_prob=0.0)
    out_img, out_label = pipe(img, label, np.random.default_rng(0))
    assert out_img.shape == (3, 32, 40)
    assert (out_img[:, 20:] == 0).all() and (out_img[:, :, 30:] == 0).all()
    assert (out_label[20:] == 255).all() and (out_label[:, 30:] == 255).all()
    np.testing.assert_array_equal(out_label[:20, :30].numpy(), label)


def test_train_pipeline_rejects_size_mismatch():
    img, label = make_pair()
    with pytest.raises(DataError, match="sizes differ"):
        TrainPipeline((80, 40), (24, 32))(img, label[:-1], np.random.default_rng(0))


def test_test_pipeline_and_preprocess(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), img)
    out = preprocess_test_image(tmp_path / "x.png")
    assert out.shape == (3, 512, 1024) and out.dtype == torch.float32
    expected = normalize(cv2.resize(img, (1024, 512), interpolation=cv2.INTER_LINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(out.numpy(), expected)
    small = _TestPipeline((64, 32))(img[:100, :150])
    assert small.shape == (3, 32, 48)  # no padding


def test_load_image_and_label(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    bgr = load_image(tmp_path / "a.png")
    assert bgr.dtype == np.uint8 and bgr.shape == (12, 20, 3)
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "l.png")
    lab = load_label(tmp_path / "l.png")
    assert lab.dtype == np.uint8 and lab.shape == (12, 20)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match="missing.png"):
        load_label(tmp_path / "missing.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    truncate_file(tmp_path / "t.png")
    with pytest.raises(DataError, match="t.png"):
        load_image(tmp_path / "t.png")
    with pytest.raises(DataError, match="t.png"):
        load_label(tmp_path / "t.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png"):
        load_image(tmp_path / "text.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="single-channel"):
        load_label(tmp_path / "rgb.png")
