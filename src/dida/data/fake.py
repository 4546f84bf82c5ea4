"""Tiny GTA / SYNTHIA / Cityscapes datasets in the exact on-disk formats, for tests and benchmarks.

Each writer lays out the real directory structure and file formats (spec 2.1):

- GTA: ``images/NNNNN.png`` (RGB) and ``labels/NNNNN.png``, a palette ('P') PNG whose indices are the
  Cityscapes *label ids*.
- SYNTHIA: ``RGB/NNNNNNN.png`` and ``GT/LABELS/NNNNNNN.png``, a 16-bit 3-channel PNG whose last BGR
  channel (as OpenCV returns it) holds the SYNTHIA class id.
- Cityscapes: ``leftImg8bit/<split>/<city>/<city>_SSSSSS_FFFFFF_leftImg8bit.png`` plus
  ``gtFine/<split>/<city>/..._gtFine_polygons.json`` and ``..._gtFine_labelIds.png`` (drawn from the
  polygons with ``cityscapesscripts``).

Labels are made of rectangular blocks of a few classes, so that class statistics and rare-class
sampling have content; the image colour of a block is the Cityscapes palette colour of its train id
plus noise, so a model can learn something. With ``convert=True`` (default) the writer also runs
``dida convert`` on the result, so ``*_labelTrainIds.png`` and the statistics files exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dida.constants import CITYSCAPES_ID_TO_TRAINID, IGNORE_INDEX, PALETTE, SYNTHIA_ID_TO_TRAINID

# Label ids used for blocks: every valid id plus a few that map to 255 (void / unknown).
_CS_VOID_IDS = (0, 4, 9, 14)  # unlabeled, static, parking, guard rail
_CS_BLOCK_IDS = tuple(sorted(CITYSCAPES_ID_TO_TRAINID)) + _CS_VOID_IDS
# SYNTHIA: the 16 ids present in the real data (not 16/18/20 -> terrain/truck/train) plus void 0.
_SYNTHIA_BLOCK_IDS = tuple(
    sorted(i for i, t in SYNTHIA_ID_TO_TRAINID.items() if t not in (9, 14, 16))
) + (0,)


def block_label_map(
    size: tuple[int, int], ids: Sequence[int], rng: np.random.Generator, grid: tuple[int, int] = (4, 3),
    classes_per_image: int = 5,
) -> np.ndarray:
    """A label map [H, W] of rectangular blocks, each filled with one id drawn from ``ids``.

    Args:
        size: (width, height).
        ids: candidate ids.
        grid: number of blocks (columns, rows); block edges are at integer multiples of W/cols, H/rows.
        classes_per_image: how many distinct ids one image uses at most.
    """
    width, height = size
    cols, rows = grid
    chosen = rng.choice(np.asarray(ids), size=min(classes_per_image, len(ids)), replace=False)
    block_ids = rng.choice(chosen, size=(rows, cols))
    ys = (np.arange(height) * rows) // height
    xs = (np.arange(width) * cols) // width
    return block_ids[ys[:, None], xs[None, :]].astype(np.int64)


def _train_id_lut(table: dict[int, int], size: int) -> np.ndarray:
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for k, v in table.items():
        lut[k] = v
    return lut


def _image_from_train_ids(train_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 image [H, W, 3]: palette colour of the train id (grey for 255) plus uniform noise."""
    colours = np.full((256, 3), 96, dtype=np.int16)
    colours[: len(PALETTE)] = np.asarray(PALETTE, dtype=np.int16)
    img = colours[train_ids] + rng.integers(-20, 21, size=train_ids.shape + (3,), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), rgb[:, :, ::-1]):
        raise OSError(f"could not write {path}")


def _gta_palette() -> list[int]:
    # Real GTA label PNGs carry the Cityscapes colour palette indexed by label id.
    from cityscapesscripts.helpers.labels import labels

    pal = [0] * (256 * 3)
    for lab in labels:
        if 0 <= lab.id < 256:
            pal[3 * lab.id: 3 * lab.id + 3] = list(lab.color)
    return pal


def write_gta_label(path: str | os.PathLike[str], label_ids: np.ndarray) -> None:
    """Write a GTA-style label: a palette ('P') PNG whose pixel indices are the label ids [H, W]."""
    img = Image.fromarray(label_ids.astype(np.uint8), mode="P")
    img.putpalette(_gta_palette())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_synthia_label(path: str | os.PathLike[str], label_ids: np.ndarray) -> None:
    """Write a SYNTHIA-style label: 16-bit 3-channel PNG, the id in the last BGR channel [H, W]."""
    h, w = label_ids.shape
    arr = np.zeros((h, w, 3), dtype=np.uint16)
    arr[:, :, 2] = label_ids.astype(np.uint16)
    # The real files carry an instance id in another channel; put something non-zero there.
    arr[:, :, 1] = (label_ids.astype(np.uint16) * 7) % 1000
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"could not write {path}")


def write_fake_gta(
    root: str | os.PathLike[str], n: int = 4, size: tuple[int, int] = (128, 64), seed: int = 0,
    *, convert: bool = True, ids: Sequence[int] = _CS_BLOCK_IDS,
) -> Path:
    """Write ``n`` GTA samples of ``size`` = (width, height) under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    lut = _train_id_lut(CITYSCAPES_ID_TO_TRAINID, 256)
    for i in range(n):
        ids_map = block_label_map(size, ids, rng)
        name = f"{i + 1:05d}"
        write_gta_label(root / "labels" / f"{name}.png", ids_map)
        _write_rgb(root / "images" / f"{name}.png", _image_from_train_ids(lut[ids_map], rng))
    if convert:
        from dida.data.convert import convert_dataset

        convert_dataset("gta", root, nproc=1, progress=False)
    return root


def write_fake_synthia(
    root: str | os.PathLike[str], n: int = 4, size: tuple[int, int] = (128, 76), seed: int = 0,
    *, convert: bool = True, ids: Sequence[int] = _SYNTHIA_BLOCK_IDS,
) -> Path:
    """Write ``n`` SYNTHIA samples of ``size`` = (width, height) under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    lut = _train_id_lut(SYNTHIA_ID_TO_TRAINID, 65536)
    for i in range(n):
        ids_map = block_label_map(size, ids, rng)
        name = f"{i:07d}"
        write_synthia_label(root / "GT" / "LABELS" / f"{name}.png", ids_map)
        _write_rgb(root / "RGB" / f"{name}.png", _image_from_train_ids(lut[ids_map], rng))
    if convert:
        from dida.data.convert import convert_dataset

        convert_dataset("synthia", root, nproc=1, progress=False)
    return root


def cityscapes_polygons(label_ids: np.ndarray) -> dict:
    """Polygons JSON content (``imgHeight``/``imgWidth``/``objects``) for a block label map [H, W].

    Each maximal block becomes one rectangle polygon (corner pixel coordinates, inclusive) labelled
    with the Cityscapes label name of its id.
    """
    from cityscapesscripts.helpers.labels import id2label

    h, w = label_ids.shape
    objects = []
    # Blocks are rectangles: find their edges from changes along the first column / row per block.
    row_edges = np.flatnonzero(np.any(label_ids[1:] != label_ids[:-1], axis=1)) + 1
    col_edges = np.flatnonzero(np.any(label_ids[:, 1:] != label_ids[:, :-1], axis=0)) + 1
    ys = np.concatenate([[0], row_edges, [h]])
    xs = np.concatenate([[0], col_edges, [w]])
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            lid = int(label_ids[y0, x0])
            objects.append({
                "label": id2label[lid].name,
                "polygon": [[int(x0), int(y0)], [int(x1) - 1, int(y0)], [int(x1) - 1, int(y1) - 1],
                            [int(x0), int(y1) - 1]],
            })
    return {"imgHeight": int(h), "imgWidth": int(w), "objects": objects}


def write_cityscapes_sample(
    root: str | os.PathLike[str], split: str, city: str, stem: str, polygons: dict, rgb: np.ndarray | None,
    *, write_label_ids: bool = True,
) -> tuple[Path, Path]:
    """Write one Cityscapes sample: polygons JSON, labelIds PNG drawn from it, and leftImg8bit image.

    Args:
        stem: ``<city>_<seq>_<frame>``.
        rgb: [H, W, 3] uint8 image; None writes none.
        write_label_ids: False skips the labelIds PNG (e.g. for deliberately invalid polygons).

    Returns:
        (polygons path, labelIds path).
    """
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    root = Path(root)
    gt_dir = root / "gtFine" / split / city
    gt_dir.mkdir(parents=True, exist_ok=True)
    poly_path = gt_dir / f"{stem}_gtFine_polygons.json"
    poly_path.write_text(json.dumps(polygons))
    ann = Annotation()
    ann.fromJsonFile(str(poly_path))
    ids_path = gt_dir / f"{stem}_gtFine_labelIds.png"
    if write_label_ids:
        createLabelImage(ann, "ids").save(ids_path)
    if rgb is not None:
        _write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
    return poly_path, ids_path


def write_fake_cityscapes(
    root: str | os.PathLike[str], splits: Sequence[str] = ("train", "val"), n_per_split: int = 2,
    size: tuple[int, int] = (128, 64), seed: int = 0, city: str = "aachen",
    *, convert: bool = True, ids: Sequence[int] = _CS_BLOCK_IDS,
) -> Path:
    """Write ``n_per_split`` Cityscapes samples per split of ``size`` = (width, height); returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    lut = _train_id_lut(CITYSCAPES_ID_TO_TRAINID, 256)
    for s_idx, split in enumerate(splits):
        for i in range(n_per_split):
            ids_map = block_label_map(size, ids, rng)
            stem = f"{city}_{s_idx:06d}_{i:06d}"
            rgb = _image_from_train_ids(lut[ids_map], rng)
            write_cityscapes_sample(root, split, city, stem, cityscapes_polygons(ids_map), rgb)
    if convert:
        from dida.data.convert import convert_dataset

        convert_dataset("cityscapes", root, nproc=1, progress=False)
    return root
