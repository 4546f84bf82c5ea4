"""Dataset classes, builders and every bad-input case at load time."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from fake_datasets import truncate_file, write_fake_gta
from PIL import Image

from dida.config import DatasetCfg
from dida.data import CityscapesDataset, FolderDataset, GTADataset, SynthiaDataset, build_dataset
from dida.errors import DataError


def check_dataset(ds, n, size):
    assert len(ds) == n == len(ds.samples)
    for i in range(len(ds)):
        img, label = ds.load(i)
        assert img.dtype == np.uint8 and img.shape == (size[1], size[0], 3)
        assert label.dtype == np.uint8 and label.shape == (size[1], size[0])
        assert set(np.unique(label)) <= set(range(19)) | {255}
        assert Path(ds.samples[i][0]).is_file() and Path(ds.samples[i][1]).is_file()


def test_gta(gta_root):
    ds = GTADataset(gta_root)
    check_dataset(ds, 6, (96, 64))
    assert [Path(i).name for i, _ in ds.samples] == [f"{k:05d}.png" for k in range(1, 7)]
    assert [Path(lab).name for _, lab in ds.samples] == [f"{k:05d}_labelTrainIds.png" for k in range(1, 7)]


def test_synthia(synthia_root):
    ds = SynthiaDataset(synthia_root)
    check_dataset(ds, 4, (96, 57))
    label = Path(ds.samples[0][1]).relative_to(synthia_root).as_posix()
    assert label == "GT/LABELS/0000000_labelTrainIds.png"


def test_cityscapes(cityscapes_root):
    for split in ("train", "val"):
        ds = CityscapesDataset(cityscapes_root, split)
        check_dataset(ds, 3, (128, 64))
        img, lab = ds.samples[0]
        assert img.endswith("_leftImg8bit.png") and f"leftImg8bit/{split}/aachen/" in Path(img).as_posix()
        expected = img.replace("leftImg8bit", "gtFine", 1)
        expected = expected.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        assert lab == expected


def test_image_colours_follow_labels(gta_root):
    # the fake images are palette colours plus noise, so classes are learnable
    img, label = GTADataset(gta_root).load(0)
    c = int(label[0, 0])
    if c != 255:
        from dida.constants import PALETTE

        assert np.abs(img[0, 0, ::-1].astype(int) - PALETTE[c]).max() <= 20


def test_folder_dataset_without_labels(gta_root):
    ds = FolderDataset(gta_root / "images", None)
    img, label = ds.load(0)
    assert label is None and img.shape == (64, 96, 3)


def test_build_dataset(gta_root, cityscapes_root, synthia_root, monkeypatch):
    assert len(build_dataset(DatasetCfg(kind="gta", root=str(gta_root)))) == 6
    assert len(build_dataset(DatasetCfg(kind="synthia", root=str(synthia_root)))) == 4
    assert len(build_dataset(DatasetCfg(kind="cityscapes", root=str(cityscapes_root), split="val"))) == 3
    folder_cfg = DatasetCfg(kind="folder", root=str(gta_root), img_dir="images", label_dir="labels")
    folder = build_dataset(folder_cfg)
    assert folder.samples == GTADataset(gta_root).samples
    monkeypatch.setenv("DIDA_DATA_ROOT", str(cityscapes_root.parent))
    assert len(build_dataset(DatasetCfg(kind="cityscapes", root="", split="train"))) == 3
    monkeypatch.delenv("DIDA_DATA_ROOT")
    with pytest.raises(DataError, match="DIDA_DATA_ROOT"):
        build_dataset(DatasetCfg(kind="gta", root=""))


# ------------------------------------------------------------------------------------- bad input


def test_missing_root_and_split(tmp_path, cityscapes_root):
    with pytest.raises(DataError, match="nope"):
        GTADataset(tmp_path / "nope")
    with pytest.raises(DataError, match="nope"):
        CityscapesDataset(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="leftImg8bit/test"):
        CityscapesDataset(cityscapes_root, "test")
    (tmp_path / "gta" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="labels"):
        GTADataset(tmp_path / "gta")


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match="no images"):
        GTADataset(tmp_path)


def test_unconverted_dataset(tmp_path):
    root = write_fake_gta(tmp_path / "gta", n=2, size=(16, 8), convert=False)
    with pytest.raises(DataError, match="dida convert gta"):
        GTADataset(root)


@pytest.fixture
def gta_copy(gta_root, tmp_path) -> Path:
    return Path(shutil.copytree(gta_root, tmp_path / "gta"))


def test_image_without_label(gta_copy):
    (gta_copy / "labels" / "00003_labelTrainIds.png").unlink()
    with pytest.raises(DataError, match="00003.png.*without its label"):
        GTADataset(gta_copy)


def test_label_with_ids_outside_table(gta_copy):
    bad = gta_copy / "labels" / "00002_labelTrainIds.png"
    label = np.asarray(Image.open(bad)).copy()
    label[0, :3] = [19, 33, 254]
    Image.fromarray(label).save(bad)
    ds = GTADataset(gta_copy)
    with pytest.raises(DataError, match=r"00002_labelTrainIds.png.*\[19, 33, 254\]"):
        ds.load(1)
    ds.load(0)


def test_mismatched_sizes(gta_copy):
    bad = gta_copy / "labels" / "00004_labelTrainIds.png"
    Image.fromarray(np.asarray(Image.open(bad))[:-2]).save(bad)
    with pytest.raises(DataError, match="00004_labelTrainIds.png.*differs"):
        GTADataset(gta_copy).load(3)


@pytest.mark.parametrize("which", ["images/00005.png", "labels/00005_labelTrainIds.png"])
def test_truncated_files(gta_copy, which):
    truncate_file(gta_copy / which)
    ds = GTADataset(gta_copy)
    with pytest.raises(DataError, match=Path(which).name) as info:
        ds.load(4)
    assert info.value.path == str(gta_copy / which)


def test_unreadable_image(gta_copy):
    (gta_copy / "images" / "00001.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="00001.png"):
        GTADataset(gta_copy).load(0)


def test_sixteen_bit_label_is_rejected(gta_copy):
    bad = gta_copy / "labels" / "00001_labelTrainIds.png"
    cv2.imwrite(str(bad), np.full((64, 96), 1000, np.uint16))
    with pytest.raises(DataError, match="00001_labelTrainIds.png"):
        GTADataset(gta_copy).load(0)
