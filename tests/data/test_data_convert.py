"""`dida convert`: train-id tables, statistics files, resumability, atomic outputs, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from fake_datasets import (
    cityscapes_polygons,
    truncate_file,
    write_cityscapes_sample,
    write_fake_cityscapes,
    write_fake_gta,
    write_fake_synthia,
    write_gta_label,
    write_synthia_label,
)
from PIL import Image

from dida.cli import main as cli_main
from dida.constants import CITYSCAPES_ID_TO_TRAINID, SYNTHIA_ID_TO_TRAINID
from dida.data.convert import STATS_FILES, convert_dataset
from dida.errors import DataError


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def load_stats(root):
    return [json.loads((Path(root) / name).read_text()) for name in STATS_FILES]


# ---------------------------------------------------------------------------------- id tables


def test_cityscapes_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels

    official = {lab.id: lab.trainId for lab in labels if lab.id >= 0 and lab.trainId not in (255, -1)}
    assert official == CITYSCAPES_ID_TO_TRAINID


def test_gta_every_label_id(tmp_path):
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    write_gta_label(tmp_path / "labels" / "00001.png", ids)
    assert Image.open(tmp_path / "labels" / "00001.png").mode == "P"
    convert_dataset("gta", tmp_path, nproc=1, progress=False)
    out = read_png(tmp_path / "labels" / "00001_labelTrainIds.png")
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    expected = np.array([CITYSCAPES_ID_TO_TRAINID.get(i, 255) for i in range(256)]).reshape(16, 16)
    np.testing.assert_array_equal(out, expected)
    (stats,) = json.loads((tmp_path / "sample_class_stats.json").read_text())
    assert stats == {**{str(t): 1 for t in range(19)}, "file": os.path.join(str(tmp_path), "labels",
                                                                             "00001_labelTrainIds.png")}


def test_synthia_every_id_and_16bit_values(tmp_path):
    ids = np.concatenate([np.arange(40), [255, 256, 1000, 65535]]).astype(np.uint16).reshape(4, 11)
    write_synthia_label(tmp_path / "GT" / "LABELS" / "0000000.png", ids)
    raw = cv2.imread(str(tmp_path / "GT" / "LABELS" / "0000000.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.ndim == 3 and (raw[:, :, -1] == ids).all()
    convert_dataset("synthia", tmp_path, nproc=1, progress=False)
    out = read_png(tmp_path / "GT" / "LABELS" / "0000000_labelTrainIds.png")
    expected = np.array([SYNTHIA_ID_TO_TRAINID.get(int(i), 255) for i in ids.ravel()]).reshape(ids.shape)
    np.testing.assert_array_equal(out, expected)


def test_cityscapes_every_label_name(tmp_path):
    from cityscapesscripts.helpers.labels import labels

    named = [lab for lab in labels if lab.id >= 0]
    assert len(named) == 34
    # one 4x4 block per label id 0..33, laid out on a 6x6 grid (last two blocks stay unlabeled = id 0)
    ids = np.zeros((24, 24), dtype=np.int64)
    for lab in named:
        r, c = divmod(lab.id, 6)
        ids[4 * r: 4 * r + 4, 4 * c: 4 * c + 4] = lab.id
    polygons = cityscapes_polygons(ids)
    # a group label and a license plate (id -1, never drawn) on top of the car block (id 26)
    r, c = divmod(26, 6)
    def square(r, c):
        return [[4 * c, 4 * r], [4 * c + 3, 4 * r], [4 * c + 3, 4 * r + 3], [4 * c, 4 * r + 3]]

    polygons["objects"].append({"label": "license plate", "polygon": square(r, c)})
    r, c = divmod(34, 6)
    polygons["objects"].append({"label": "cargroup", "polygon": square(r, c)})
    write_cityscapes_sample(tmp_path, "train", "aachen", "aachen_000000_000000", polygons, None)
    convert_dataset("cityscapes", tmp_path, nproc=1, progress=False)
    out = read_png(tmp_path / "gtFine/train/aachen/aachen_000000_000000_gtFine_labelTrainIds.png")
    expected = np.vectorize(lambda i: CITYSCAPES_ID_TO_TRAINID.get(int(i), 255))(ids).astype(np.uint8)
    expected[4 * r: 4 * r + 4, 4 * c: 4 * c + 4] = CITYSCAPES_ID_TO_TRAINID[26]  # cargroup -> car
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------------------------- statistics


def expected_stats(files: list[str], outputs: list[Path]) -> list[dict]:
    result = []
    for file, out in zip(files, outputs):
        values, counts = np.unique(read_png(out), return_counts=True)
        entry = {str(v): int(n) for v, n in zip(values, counts) if v != 255}
        entry["file"] = file
        result.append(entry)
    return result


def test_gta_statistics_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_fake_gta(Path("data/gta"), n=3, size=(40, 24), seed=5, convert=False)
    summary = convert_dataset("gta", "data/gta", nproc=1, progress=False)
    assert summary == {"files": 3, "converted": 3, "skipped": 0}
    stats, stats_dict, with_class = load_stats("data/gta")
    files = [f"data/gta/labels/{i:05d}_labelTrainIds.png" for i in (1, 2, 3)]
    assert [s["file"] for s in stats] == files
    assert stats == expected_stats(files, [Path(f) for f in files])
    for s in stats:  # keys are strings, ascending train ids, "file" last; 255 never counted
        keys = list(s)
        assert keys[-1] == "file" and keys[:-1] == sorted(keys[:-1], key=int) and "255" not in keys
    assert stats_dict == {s["file"]: {k: v for k, v in s.items() if k != "file"} for s in stats}
    first_seen = list(dict.fromkeys(k for s in stats for k in s if k != "file"))
    assert list(with_class) == first_seen
    for c, entries in with_class.items():
        assert entries == [[s["file"], s[c]] for s in stats if c in s]


def test_cityscapes_split_lists_and_train_only_stats(cityscapes_root):
    assert (cityscapes_root / "train.txt").read_text().splitlines() == [
        "aachen/aachen_000000_000000", "aachen/aachen_000000_000001", "aachen/aachen_000000_000002"]
    assert len((cityscapes_root / "val.txt").read_text().splitlines()) == 3
    for split in ("train", "val"):
        assert len(list((cityscapes_root / "gtFine" / split).rglob("*_gtFine_labelTrainIds.png"))) == 3
    stats, _, _ = load_stats(cityscapes_root)
    assert [Path(s["file"]).parent.parent.name for s in stats] == ["train"] * 3
    assert stats == expected_stats([s["file"] for s in stats], [Path(s["file"]) for s in stats])


def test_parallel_equals_serial(tmp_path):
    for name in ("a", "b"):
        write_fake_synthia(tmp_path / name, n=5, size=(30, 20), seed=0, convert=False)
    convert_dataset("synthia", tmp_path / "a", nproc=1, progress=False)
    convert_dataset("synthia", tmp_path / "b", nproc=2, progress=False)
    sa, sb = load_stats(tmp_path / "a")[0], load_stats(tmp_path / "b")[0]
    assert [{k: v for k, v in s.items() if k != "file"} for s in sa] == \
           [{k: v for k, v in s.items() if k != "file"} for s in sb]
    assert [Path(s["file"]).name for s in sa] == [Path(s["file"]).name for s in sb]


# ---------------------------------------------------------------------------------- resume / atomic


def test_resume_skips_converted_files_and_keeps_full_stats(tmp_path):
    root = write_fake_gta(tmp_path / "gta", n=4, size=(32, 16), seed=0, convert=False)
    convert_dataset("gta", root, nproc=1, progress=False)
    before = load_stats(root)
    out2 = root / "labels" / "00002_labelTrainIds.png"
    out2.unlink()
    (root / "sample_class_stats.json").unlink()
    summary = convert_dataset("gta", root, nproc=1, progress=False)
    assert summary == {"files": 4, "converted": 1, "skipped": 3}
    assert load_stats(root) == before
    assert convert_dataset("gta", root, nproc=1, force=True, progress=False)["converted"] == 4
    # an unreadable previous output is converted again
    truncate_file(out2)
    assert convert_dataset("gta", root, nproc=1, progress=False)["converted"] == 1
    assert load_stats(root) == before


def test_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    root = write_fake_gta(tmp_path / "gta", n=2, size=(32, 16), seed=0, convert=False)
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:20])  # half-written ...
        raise KeyboardInterrupt  # ... then the user presses Ctrl-C

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset("gta", root, nproc=1, progress=False)
    assert sorted(p.name for p in (root / "labels").iterdir()) == ["00001.png", "00002.png"]


# ---------------------------------------------------------------------------------- bad inputs


def test_missing_root_and_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        convert_dataset("gta", tmp_path / "nope", progress=False)
    (tmp_path / "gta").mkdir()
    with pytest.raises(DataError, match="labels"):
        convert_dataset("gta", tmp_path / "gta", progress=False)
    (tmp_path / "gta" / "labels").mkdir()
    with pytest.raises(DataError, match="no label files"):
        convert_dataset("gta", tmp_path / "gta", progress=False)
    (tmp_path / "cs").mkdir()
    with pytest.raises(DataError, match="gtFine"):
        convert_dataset("cityscapes", tmp_path / "cs", progress=False)


@pytest.mark.parametrize("kind", ["gta", "synthia"])
def test_truncated_label_names_the_file(tmp_path, kind):
    writer = write_fake_gta if kind == "gta" else write_fake_synthia
    root = writer(tmp_path / kind, n=2, size=(64, 48), seed=0, convert=False)
    label_dir = root / ("labels" if kind == "gta" else "GT/LABELS")
    bad = sorted(label_dir.iterdir())[1]
    truncate_file(bad)
    with pytest.raises(DataError, match=bad.name):
        convert_dataset(kind, root, nproc=1, progress=False)
    assert not list(label_dir.glob("*.tmp*"))


def test_truncated_label_in_worker_process(tmp_path):
    root = write_fake_gta(tmp_path / "gta", n=3, size=(64, 48), seed=0, convert=False)
    truncate_file(root / "labels" / "00003.png")
    with pytest.raises(DataError, match="00003.png"):
        convert_dataset("gta", root, nproc=2, progress=False)


def test_rgb_gta_label_is_rejected(tmp_path):
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "labels" / "00001.png")
    with pytest.raises(DataError, match="single-channel"):
        convert_dataset("gta", tmp_path, nproc=1, progress=False)


def test_cityscapes_bad_polygons(tmp_path):
    ids = np.full((8, 8), 7)
    polygons = cityscapes_polygons(ids)
    polygons["objects"][0]["label"] = "spaceship"
    write_cityscapes_sample(tmp_path, "train", "x", "x_000000_000000", polygons, None, write_label_ids=False)
    with pytest.raises(DataError, match="spaceship"):
        convert_dataset("cityscapes", tmp_path, nproc=1, progress=False)
    path = tmp_path / "gtFine/train/x/x_000000_000000_gtFine_polygons.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="x_000000_000000_gtFine_polygons.json"):
        convert_dataset("cityscapes", tmp_path, nproc=1, progress=False)
    assert not list(path.parent.glob("*labelTrainIds*"))


def test_cli(tmp_path, capsys):
    root = write_fake_cityscapes(tmp_path / "cs", splits=("train",), n_per_split=1, size=(16, 8),
                                 convert=False)
    assert cli_main(["convert", "cityscapes", str(root), "--nproc", "1"]) == 0
    assert "1 converted" in capsys.readouterr().out
    assert cli_main(["convert", "gta", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
