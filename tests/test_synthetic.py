"""The synthetic benchmark: determinism, on-disk formats (GTA / Cityscapes), the domain gap, conversion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dida.constants import CITYSCAPES_ID_TO_TRAINID, IGNORE_INDEX, NUM_CLASSES
from dida.data import convert, synthetic
from dida.data.synthetic import SynthParams, generate

SMALL = {"num_source": 3, "num_target_train": 3, "num_val": 2, "width": 96, "height": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthParams(seed=0, **SMALL), nproc=1, progress=False)
    return root


def test_layout_and_names(synth_root: Path):
    gta = synth_root / "gta"
    assert sorted(p.name for p in (gta / "images").iterdir()) == ["00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in (gta / "labels").iterdir()) == ["00001.png", "00002.png", "00003.png"]
    cs = synth_root / "cityscapes"
    train = sorted((cs / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
    val = sorted((cs / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))
    assert len(train) == 3 and len(val) == 2
    for img in train + val:
        split, city = img.parts[-3], img.parts[-2]
        stem = img.name[: -len("_leftImg8bit.png")]
        assert stem.startswith(f"{city}_000000_") and len(stem.split("_")[-1]) == 6
        gt = cs / "gtFine" / split / city
        assert (gt / f"{stem}_gtFine_polygons.json").is_file()
        assert (gt / f"{stem}_gtFine_labelIds.png").is_file()
    manifest = json.loads((synth_root / synthetic.MANIFEST_NAME).read_text())
    assert manifest["seed"] == 0 and manifest["width"] == 96
    assert manifest["version"] == synthetic.GENERATOR_VERSION


def test_gta_formats(synth_root: Path):
    valid = set(CITYSCAPES_ID_TO_TRAINID) | {synthetic.UNLABELED_ID}
    for name in ("00001.png", "00002.png"):
        with Image.open(synth_root / "gta" / "images" / name) as img:
            assert img.mode == "RGB" and img.size == (96, 48)
        with Image.open(synth_root / "gta" / "labels" / name) as lab:
            assert lab.mode == "P", "GTA labels are paletted PNGs of label ids"
            ids = np.asarray(lab)
        assert ids.shape == (48, 96)
        assert set(np.unique(ids).tolist()) <= valid
        assert 7 in ids and 23 in ids  # road and sky are always drawn


def test_polygons_render_to_label_ids(synth_root: Path, tmp_path: Path):
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    jsons = sorted((synth_root / "cityscapes" / "gtFine").rglob("*_gtFine_polygons.json"))
    assert len(jsons) == 5
    for j in jsons:
        data = json.loads(j.read_text())
        assert data["imgWidth"] == 96 and data["imgHeight"] == 48
        assert all(len(o["polygon"]) >= 3 and isinstance(o["label"], str) for o in data["objects"])
        out = tmp_path / "render.png"
        json2labelImg(str(j), str(out), "ids")
        rendered = np.asarray(Image.open(out))
        written = np.asarray(Image.open(str(j).replace("_polygons.json", "_labelIds.png")))
        np.testing.assert_array_equal(rendered, written)
        # Train ids through the same path the converter uses agree with the label ids.
        json2labelImg(str(j), str(out), "trainIds")
        lut = np.full(256, IGNORE_INDEX, np.uint8)
        for i, t in CITYSCAPES_ID_TO_TRAINID.items():
            lut[i] = t
        np.testing.assert_array_equal(np.asarray(Image.open(out)), lut[written])


def test_deterministic_and_independent_of_nproc(synth_root: Path, tmp_path: Path):
    again = tmp_path / "again"
    generate(again, SynthParams(seed=0, **SMALL), nproc=2, progress=False)
    assert _files(again) == _files(synth_root)
    other = tmp_path / "other"
    generate(other, SynthParams(seed=1, **SMALL), nproc=1, progress=False)
    a, b = _files(other), _files(synth_root)
    assert a.keys() == b.keys()
    assert a["gta/images/00001.png"] != b["gta/images/00001.png"]
    assert a["gta/labels/00001.png"] != b["gta/labels/00001.png"]


def test_images_align_with_labels():
    """Rendered regions follow the label map: every instance's pixels are exactly its polygon's."""
    rng = np.random.default_rng(3)
    objs, scene = synthetic.sample_layout(rng, 128, 64, ego_vehicle=True)
    inst = synthetic.rasterize_instances(objs, 128, 64)
    ids = synthetic.label_ids_from_instances(inst, objs)
    assert inst.min() >= 1  # the sky covers the frame: no unlabeled pixel
    assert (ids == synthetic.EGO_VEHICLE_ID).any()  # target frames show the ego vehicle (ignored)
    img = synthetic.render(rng, objs, inst, scene, synthetic.SOURCE_STYLE)
    assert img.shape == (64, 128, 3) and img.dtype == np.uint8


def _class_means(images: list[np.ndarray], labels: list[np.ndarray]) -> np.ndarray:
    sums = np.zeros((NUM_CLASSES, 3))
    counts = np.zeros(NUM_CLASSES)
    for img, lab in zip(images, labels):
        t = np.full(256, IGNORE_INDEX, np.int64)
        for i, c in CITYSCAPES_ID_TO_TRAINID.items():
            t[i] = c
        tid = t[lab].ravel()
        keep = tid != IGNORE_INDEX
        np.add.at(sums, tid[keep], img.reshape(-1, 3)[keep].astype(np.float64))
        counts += np.bincount(tid[keep], minlength=NUM_CLASSES)
    with np.errstate(invalid="ignore"):
        return sums / counts[:, None]


def test_domain_gap(tmp_path: Path):
    """Per-class mean colours differ between domains while the class layout is shared."""
    params = SynthParams(seed=0, num_source=12, num_target_train=12, num_val=1, width=128, height=64)
    generate(tmp_path, params, nproc=1, progress=False)
    rgb = lambda p: np.asarray(Image.open(p).convert("RGB"))
    src_img = [rgb(p) for p in sorted((tmp_path / "gta/images").glob("*.png"))]
    src_lab = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "gta/labels").glob("*.png"))]
    cs = tmp_path / "cityscapes"
    tgt_img = [rgb(p) for p in sorted((cs / "leftImg8bit/train").rglob("*.png"))]
    tgt_lab = [np.asarray(Image.open(p)) for p in sorted((cs / "gtFine/train").rglob("*_labelIds.png"))]
    ms, mt = _class_means(src_img, src_lab), _class_means(tgt_img, tgt_lab)
    both = ~np.isnan(ms).any(1) & ~np.isnan(mt).any(1)
    assert both.sum() >= 8
    dist = np.linalg.norm(ms[both] - mt[both], axis=1)
    assert (dist > 15).mean() >= 0.75, dist  # most classes change colour by more than 15 grey levels
    # Shared layout: class frequencies are of the same order in both domains.
    fs = np.bincount(np.concatenate([a.ravel() for a in src_lab]), minlength=256)[[7, 23, 11]]
    ft = np.bincount(np.concatenate([a.ravel() for a in tgt_lab]), minlength=256)[[7, 23, 11]]
    assert np.all(fs > 0) and np.all(ft > 0)
    assert np.all(np.abs(np.log(fs / ft)) < np.log(3))


def test_cli_synth(tmp_path: Path):
    from dida.cli import main

    rc = main(["synth", str(tmp_path), "--num-source", "1", "--num-target-train", "1", "--num-val", "1",
               "--size", "64", "32", "--nproc", "1"])
    assert rc == 0
    assert (tmp_path / "gta/images/00001.png").is_file()
    assert synthetic.read_manifest(tmp_path)["num_val"] == 1


def test_convert_works_on_synthetic_output(tmp_path: Path):
    generate(tmp_path, SynthParams(seed=0, **SMALL), nproc=1, progress=False)
    convert.convert_dataset("gta", str(tmp_path / "gta"), nproc=1)
    convert.convert_dataset("cityscapes", str(tmp_path / "cityscapes"), nproc=1)
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for i, t in CITYSCAPES_ID_TO_TRAINID.items():
        lut[i] = t
    for lab in sorted((tmp_path / "gta/labels").glob("?????.png")):
        train_ids = np.asarray(Image.open(lab.with_name(lab.stem + "_labelTrainIds.png")))
        np.testing.assert_array_equal(train_ids, lut[np.asarray(Image.open(lab))])
    for lab in sorted((tmp_path / "cityscapes/gtFine").rglob("*_gtFine_labelIds.png")):
        train_ids = np.asarray(Image.open(str(lab).replace("_labelIds", "_labelTrainIds")))
        np.testing.assert_array_equal(train_ids, lut[np.asarray(Image.open(lab))])
    assert (tmp_path / "gta/sample_class_stats.json").is_file()
    assert (tmp_path / "cityscapes/sample_class_stats.json").is_file()
