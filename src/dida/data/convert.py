"""Label ids -> train ids, plus the rare-class statistics files (spec 2.3; ``dida convert``).

For every source label file the converter writes ``<name>_labelTrainIds.png`` (uint8, train ids 0..18,
everything else 255) next to it and collects the per-file pixel count of each train id. The counts are
saved in the three JSON files the reference writes into the dataset root:

- ``sample_class_stats.json``: a list with one object per label file: ``{"<trainId>": count, ...,
  "file": "<root>/labels/00001_labelTrainIds.png"}`` (classes with zero pixels omitted, 255 never
  counted; ``file`` is built from the root exactly as given on the command line);
- ``sample_class_stats_dict.json``: ``{file: {"<trainId>": count}}``;
- ``samples_with_class.json``: ``{"<trainId>": [[file, count], ...]}`` (file order; classes in
  first-seen order).

The run is resumable: an output that already exists, is not older than its source and can be read is not
rewritten unless ``force``; its statistics are still computed from it, so the JSON files always cover every
file. A source label changed after its conversion (newer than the output) is converted again.
Every output is written atomically, so an interrupted run never leaves a half-written PNG.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dida.constants import (
    GTA_ID_TO_TRAINID,
    IGNORE_INDEX,
    NUM_CLASSES,
    SYNTHIA_ID_TO_TRAINID,
)
from dida.data.kinds import convertible_kinds
from dida.data.transforms import MAX_IMAGE_PIXELS, check_image_size, load_label
from dida.errors import DataError
from dida.io import atomic_open, atomic_path
from dida.runtime import MAX_PROCESSES, ignore_interrupts

STATS_FILES = ("sample_class_stats.json", "sample_class_stats_dict.json", "samples_with_class.json")
TRAIN_ID_SUFFIX = "_labelTrainIds.png"
CITYSCAPES_POLYGON_SUFFIX = "_gtFine_polygons.json"
CITYSCAPES_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"


def id_lookup_table(table: dict[int, int], size: int) -> np.ndarray:
    """A uint8 lookup table of ``size`` entries: ``lut[label_id] = train_id``, unknown ids -> 255."""
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in table.items():
        lut[label_id] = train_id
    return lut


def class_stats(train_ids: np.ndarray, num_classes: int = NUM_CLASSES) -> dict[str, int]:
    """Pixel count of every train id present in ``train_ids`` [H, W] (keys are strings, 255 excluded)."""
    counts = np.bincount(train_ids.ravel(), minlength=256)
    return {str(c): int(counts[c]) for c in range(num_classes) if counts[c] > 0}


# ------------------------------------------------------------------------------------ readers


def read_gta_label_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """GTA label ids [H, W] uint8 from a palette PNG (PIL: the array holds the palette indices)."""
    check_image_size(path, path)
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the label PNG ({e}). Re-download or remove the file.") from None
    if arr.ndim != 2:
        raise DataError(
            f"{path}: expected a single-channel (palette or grey) label-id PNG, got shape {arr.shape}. "
            "GTA labels are palette PNGs whose indices are Cityscapes label ids."
        )
    return arr


def read_synthia_label_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """SYNTHIA class ids [H, W] (uint16): the last channel of the 16-bit PNG as OpenCV returns it."""
    if os.path.isfile(path):
        check_image_size(path, path)
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{path}: OpenCV cannot read this label PNG (missing, truncated or not a PNG). "
                        "Re-extract the SYNTHIA archive or remove the file.")
    # The reference indexes [:, :, -1]; a single-channel file is taken as the id map itself.
    return arr[:, :, -1] if arr.ndim == 3 else arr



def _save_train_ids(path: str, train_ids: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(train_ids, mode="L").save(tmp, format="PNG")


# ------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class _Task:
    kind: str
    src: str  # label-id file (GTA/SYNTHIA) or polygons JSON (Cityscapes)
    dst: str  # the train-id PNG written
    stats: bool  # whether class statistics are wanted for this file
    force: bool


_LUTS: dict[str, np.ndarray] = {}


def _lut(kind: str) -> np.ndarray:
    if kind not in _LUTS:
        table, size = (GTA_ID_TO_TRAINID, 256) if kind == "gta" else (SYNTHIA_ID_TO_TRAINID, 65536)
        _LUTS[kind] = id_lookup_table(table, size)
    return _LUTS[kind]


def _validate_polygons(path: str) -> None:
    """Check a Cityscapes polygons JSON before cityscapesscripts sees it (it calls sys.exit on errors)."""
    from cityscapesscripts.helpers.labels import name2label

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        width, height = int(data["imgWidth"]), int(data["imgHeight"])
        objects = data["objects"]
        if not isinstance(objects, list):
            raise TypeError(f"objects is a {type(objects).__name__}, not a list")
        labels = []
        for obj in objects:
            if not isinstance(obj["label"], str):
                raise TypeError(f"a label is a {type(obj['label']).__name__}, not a name: {obj['label']!r}")
            labels.append(obj["label"])
            points = obj["polygon"]
            if not isinstance(points, list) or len(points) < 2 or any(
                    not isinstance(p, list) or len(p) != 2 for p in points):
                raise ValueError(f"the polygon of '{obj['label']}' is not a list of at least 2 [x, y] points")
            if not all(math.isfinite(float(c)) for p in points for c in p):
                raise ValueError(f"the polygon of '{obj['label']}' has a NaN or infinite coordinate")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise DataError(
            f"{path}: not a valid Cityscapes polygons file ({type(e).__name__}: {e}); it needs imgWidth, "
            "imgHeight and objects with label and polygon. Re-extract gtFine or remove the file."
        ) from None
    if not (1 <= width and 1 <= height and width * height <= MAX_IMAGE_PIXELS):
        raise DataError(f"{path}: imgWidth x imgHeight = {width}x{height} is not an image size dida converts (1 to "
                        f"{MAX_IMAGE_PIXELS} pixels). Re-extract gtFine or remove the file.")
    for label in labels:
        name = label[: -len("group")] if label not in name2label and label.endswith("group") else label
        if name not in name2label:
            raise DataError(f"{path}: unknown Cityscapes label '{label}' (not in cityscapesscripts' "
                            "label definitions). Fix or remove the object.")


def _convert(task: _Task) -> np.ndarray:
    """Write ``task.dst`` from ``task.src`` and return the train ids [H, W] uint8."""
    if task.kind == "cityscapes":
        from cityscapesscripts.preparation.json2labelImg import json2labelImg

        _validate_polygons(task.src)
        with atomic_path(task.dst) as tmp:
            json2labelImg(task.src, str(tmp), "trainIds")
        return load_label(task.dst)
    ids = read_gta_label_ids(task.src) if task.kind == "gta" else read_synthia_label_ids(task.src)
    lut = _lut(task.kind)
    if ids.dtype.kind not in "ui" or (ids.size and int(ids.max()) >= lut.size):
        top = ids.max() if ids.size else "?"
        raise DataError(f"{task.src}: label values up to {top} ({ids.dtype}) are not {task.kind} label ids (0 to "
                        f"{lut.size - 1}). Is this the dataset's label file? Re-extract it or remove it.")
    train_ids = lut[ids]
    _save_train_ids(task.dst, train_ids)
    return train_ids


def _up_to_date(dst: str, src: str) -> bool:
    """``dst`` exists and is not older than ``src`` (a source label changed since: convert it again)."""
    try:
        return os.stat(dst).st_mtime_ns >= os.stat(src).st_mtime_ns
    except OSError:
        return False


def _run_task(task: _Task) -> tuple[dict[str, int | str] | None, bool]:
    """Convert one file (or reuse its output). Returns (stats or None, whether it was written)."""
    train_ids = None
    if not task.force and _up_to_date(task.dst, task.src):
        try:
            train_ids = load_label(task.dst)
        except DataError:
            train_ids = None  # unreadable previous output: convert again
    written = train_ids is None
    if written:
        train_ids = _convert(task)
    if not task.stats:
        return None, written
    stats: dict[str, int | str] = dict(class_stats(train_ids))
    stats["file"] = task.dst
    return stats, written


# ------------------------------------------------------------------------------------ file lists


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found. Check the dataset root and layout (spec: "
                        "GTA root/labels, SYNTHIA root/GT/LABELS, Cityscapes root/gtFine/<split>/<city>).")


def _label_id_files(label_dir: Path) -> list[str]:
    # Source labels are the PNGs whose name ends in a digit (this skips *_labelTrainIds.png).
    return sorted(
        e.name for e in os.scandir(label_dir) if e.name.endswith(".png") and e.name[-5:-4].isdigit()
    )


def _tasks(kind: str, root: str, force: bool) -> tuple[list[_Task], dict[str, list[str]]]:
    """The conversion tasks and (Cityscapes only) the names for ``<split>.txt``."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"{root}: dataset root not found. Pass the folder that holds the {kind} data.")
    splits: dict[str, list[str]] = {}
    if kind in ("gta", "synthia"):
        rel = ("labels",) if kind == "gta" else ("GT", "LABELS")
        label_dir = root_path.joinpath(*rel)
        _require_dir(label_dir, "label")
        names = _label_id_files(label_dir)
        if not names:
            raise DataError(f"{label_dir}: no label files (NNNNN.png) found. Is the dataset extracted?")
        tasks = [
            _Task(kind, os.path.join(root, *rel, n), os.path.join(root, *rel, n[:-4] + TRAIN_ID_SUFFIX),
                  True, force)
            for n in names
        ]
        return tasks, splits
    gt_dir = root_path / "gtFine"
    _require_dir(gt_dir, "gtFine")
    tasks = []
    for split in sorted(e.name for e in os.scandir(gt_dir) if e.is_dir()):
        split_dir = gt_dir / split
        rels = sorted(str(p.relative_to(split_dir)) for p in split_dir.rglob(f"*{CITYSCAPES_POLYGON_SUFFIX}"))
        if split in ("train", "val", "test"):
            splits[split] = [r[: -len(CITYSCAPES_POLYGON_SUFFIX)] for r in rels]
        for r in rels:
            src = os.path.join(root, "gtFine", split, r)
            dst = src[: -len(CITYSCAPES_POLYGON_SUFFIX)] + CITYSCAPES_TRAIN_ID_SUFFIX
            tasks.append(_Task(kind, src, dst, split == "train", force))
    if not tasks:
        raise DataError(f"{gt_dir}: no *{CITYSCAPES_POLYGON_SUFFIX} files found. "
                        "Extract gtFine_trainvaltest.zip into the root.")
    return tasks, splits


# ------------------------------------------------------------------------------------ statistics


def save_class_stats(out_dir: str | os.PathLike[str], sample_class_stats: list[dict]) -> None:
    """Write the three statistics files (spec 2.3) atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    with atomic_open(out_dir / "sample_class_stats.json") as f:
        json.dump(sample_class_stats, f, indent=2)
    stats_dict: dict[str, dict[str, int]] = {}
    for stats in sample_class_stats:
        counts = {k: v for k, v in stats.items() if k != "file"}
        stats_dict[stats["file"]] = counts
    with atomic_open(out_dir / "sample_class_stats_dict.json") as f:
        json.dump(stats_dict, f, indent=2)
    samples_with_class: dict[str, list[list]] = {}
    for file, counts in stats_dict.items():
        for c, n in counts.items():
            samples_with_class.setdefault(c, []).append([file, n])
    with atomic_open(out_dir / "samples_with_class.json") as f:
        json.dump(samples_with_class, f, indent=2)


# ------------------------------------------------------------------------------------ entry points


def _run_all(tasks: list[_Task], nproc: int, progress: bool, desc: str) -> Iterable[tuple[dict | None, bool]]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=desc, unit="file", disable=not progress)
    try:
        if nproc <= 1:
            for t in tasks:
                yield _run_task(t)
                bar.update()
        else:
            chunk = max(1, min(16, len(tasks) // (nproc * 8)))
            with get_context().Pool(nproc, initializer=ignore_interrupts) as pool:
                for result in pool.imap(_run_task, tasks, chunksize=chunk):
                    yield result
                    bar.update()
    finally:
        bar.close()


def convert_dataset(
    kind: str, root: str | os.PathLike[str], nproc: int = 4, force: bool = False, progress: bool = True
) -> dict[str, int]:
    """Convert a dataset's labels to train ids and write the class statistics into ``root``.

    Args:
        kind: "gta", "synthia" or "cityscapes".
        root: dataset root; the ``file`` entries of the statistics are built from it as given.
        nproc: worker processes (1 = in this process).
        force: rewrite outputs that already exist.
        progress: show a tqdm bar.

    Returns:
        ``{"files": n, "converted": written, "skipped": reused}``.
    """
    if kind not in convertible_kinds():
        raise DataError(f"unknown dataset kind '{kind}'; choose one of {', '.join(convertible_kinds())}.")
    if not 1 <= nproc <= MAX_PROCESSES:
        raise DataError(f"--nproc must be in [1, {MAX_PROCESSES}], got {nproc}.")
    root = os.fspath(root)
    tasks, splits = _tasks(kind, root, force)
    sample_class_stats = []
    written = 0
    for stats, was_written in _run_all(tasks, nproc, progress, f"convert {kind}"):
        written += was_written
        if stats is not None:
            sample_class_stats.append(stats)
    for split, names in splits.items():
        with atomic_open(Path(root) / f"{split}.txt") as f:
            f.write("\n".join(names))
    save_class_stats(root, sample_class_stats)
    return {"files": len(tasks), "converted": written, "skipped": len(tasks) - written}
