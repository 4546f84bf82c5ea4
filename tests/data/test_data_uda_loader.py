"""SourceTargetDataset, ValDataset, collate, the infinite loader and the config builder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import truncate_file

from dida.config import DataCfg, DatasetCfg, RareClassSamplingCfg
from dida.data import CityscapesDataset, GTADataset, build_uda_datasets
from dida.data.loader import InfiniteSampler, build_train_loader
from dida.data.rcs import RareClassSampler
from dida.data.transforms import TrainPipeline
from dida.data.uda import SourceTargetDataset, ValDataset, collate_uda
from dida.errors import DataError

CROP = (32, 48)


def make_pair_dataset(gta_root, cityscapes_root, rcs=True, seed=0, min_pixels=300):
    sampler = RareClassSampler.from_stats(gta_root, temperature=0.01, min_pixels=min_pixels) if rcs else None
    return SourceTargetDataset(
        GTADataset(gta_root), CityscapesDataset(cityscapes_root, "train"),
        TrainPipeline((96, 64), CROP, cat_max_ratio=0.75), TrainPipeline((128, 64), CROP, cat_max_ratio=1.0),
        rcs=sampler, seed=seed, min_crop_ratio=0.5,
    )


def assert_items_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_item_layout_and_determinism(gta_root, cityscapes_root):
    ds = make_pair_dataset(gta_root, cityscapes_root)
    item = ds[5]
    assert item["img"].shape == (3, *CROP) and item["img"].dtype == torch.float32
    assert item["target_img"].shape == (3, *CROP) and item["target_img"].dtype == torch.float32
    assert item["label"].shape == CROP and item["label"].dtype == torch.int64
    assert item["target_label"].shape == CROP and item["target_label"].dtype == torch.int64
    assert Path(item["source_file"]).parent.name == "images" and "leftImg8bit" in item["target_file"]
    assert item["bad_files"] == [] and item["rcs_class"] in ds.rcs.classes
    assert len(ds) == 6 * 3
    assert_items_equal(item, make_pair_dataset(gta_root, cityscapes_root)[5])
    others = [ds[k] for k in range(6)]
    assert len({(o["source_file"], o["target_file"], o["img"].sum().item()) for o in others}) > 1
    other_seed = make_pair_dataset(gta_root, cityscapes_root, seed=1)[5]
    assert not torch.equal(other_seed["img"], item["img"])


def test_rcs_crops_contain_the_drawn_class(gta_root, cityscapes_root):
    ds = make_pair_dataset(gta_root, cityscapes_root, min_pixels=300)
    hits = 0
    for k in range(20):
        item = ds[k]
        hits += int((item["label"] == item["rcs_class"]).sum()) > 150
    assert hits >= 18  # up to 11 pipeline runs per item make a miss rare


def test_without_rcs_source_is_uniform(gta_root, cityscapes_root):
    ds = make_pair_dataset(gta_root, cityscapes_root, rcs=False)
    files = {ds[k]["source_file"] for k in range(40)}
    assert len(files) == 6
    assert ds[0]["rcs_class"] == -1


def test_corrupt_source_is_replaced_and_recorded(gta_root, cityscapes_root, tmp_path):
    root = Path(shutil.copytree(gta_root, tmp_path / "gta"))
    for i in (1, 2, 3, 4):
        truncate_file(root / "images" / f"0000{i}.png")
    ds = make_pair_dataset(root, cityscapes_root, rcs=False)
    items = [ds[k] for k in range(10)]
    bad = [f for it in items for f in it["bad_files"]]
    assert bad and set(bad) <= {str(root / "images" / f"0000{i}.png") for i in (1, 2, 3, 4)}
    assert {Path(it["source_file"]).name for it in items} <= {"00005.png", "00006.png"}


def test_all_corrupt_gives_up(gta_root, cityscapes_root, tmp_path):
    root = Path(shutil.copytree(gta_root, tmp_path / "gta"))
    for p in (root / "images").iterdir():
        truncate_file(p)
    ds = make_pair_dataset(root, cityscapes_root, rcs=False)
    with pytest.raises(DataError, match="in a row could not be read"):
        ds[0]


def test_stats_of_another_dataset(gta_root, cityscapes_root, tmp_path):
    root = Path(shutil.copytree(gta_root, tmp_path / "gta"))
    for p in list(root.rglob("00006*")):
        p.unlink()
    with pytest.raises(DataError, match="00006_labelTrainIds.png.*dida convert"):
        make_pair_dataset(root, cityscapes_root, min_pixels=100)


def test_collate(gta_root, cityscapes_root):
    ds = make_pair_dataset(gta_root, cityscapes_root)
    batch = collate_uda([ds[0], ds[1]])
    assert batch["img"].shape == (2, 3, *CROP) and batch["label"].shape == (2, *CROP)
    assert batch["target_img"].shape == (2, 3, *CROP) and batch["rcs_class"].shape == (2,)
    assert len(batch["source_file"]) == 2 and batch["bad_files"] == []


def test_val_dataset(cityscapes_root):
    val = ValDataset(CityscapesDataset(cityscapes_root, "val"), img_scale=(64, 32))
    item = val[1]
    assert item["img"].shape == (3, 32, 64) and item["img"].dtype == torch.float32
    assert item["label"].dtype == np.uint8 and item["label"].shape == (64, 128)
    assert item["ori_shape"] == (64, 128) and item["filename"].endswith("_leftImg8bit.png")
    assert len(val) == 3


def test_infinite_sampler():
    it = iter(InfiniteSampler(start=3, rank=1, world_size=2))
    assert [next(it) for _ in range(4)] == [7, 9, 11, 13]
    with pytest.raises(ValueError):
        InfiniteSampler(rank=2, world_size=2)


def take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    del it
    return out


def test_loader_workers_and_resume_give_identical_batches(gta_root, cityscapes_root):
    ds = make_pair_dataset(gta_root, cityscapes_root)
    serial = take(build_train_loader(ds, batch_size=2, num_workers=0, seed=0), 3)
    parallel = take(build_train_loader(ds, batch_size=2, num_workers=2, seed=0), 3)
    resumed = take(build_train_loader(ds, batch_size=2, num_workers=0, start_iter=2), 1)
    for a, b in zip(serial, parallel):
        assert_items_equal(a, b)
    assert_items_equal(serial[2], resumed[0])
    assert serial[0]["img"].shape == (2, 3, *CROP)
    assert serial[0]["source_file"] == [ds[0]["source_file"], ds[1]["source_file"]]


def test_build_uda_datasets(gta_root, cityscapes_root, tmp_path):
    data = DataCfg(
        source=DatasetCfg(kind="gta", root=str(gta_root), img_scale=[96, 64], crop_size=list(CROP),
                          cat_max_ratio=0.75),
        target=DatasetCfg(kind="cityscapes", root=str(cityscapes_root), img_scale=[128, 64],
                          crop_size=list(CROP)),
        val=DatasetCfg(kind="cityscapes", root=str(cityscapes_root), split="val", img_scale=[64, 32]),
        rcs=RareClassSamplingCfg(min_pixels=300),
    )
    train, val = build_uda_datasets(data, seed=3)
    assert train.rcs is not None and train.seed == 3 and train.source_pipeline.cat_max_ratio == 0.75
    assert train[0]["img"].shape == (3, *CROP) and val[0]["img"].shape == (3, 32, 64)
    data.rcs.enabled = False
    assert build_uda_datasets(data)[0].rcs is None
    data.rcs.enabled = True
    data.rcs.stats_dir = str(tmp_path)
    with pytest.raises(DataError, match="dida convert"):
        build_uda_datasets(data)
