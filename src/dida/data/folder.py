"""``FolderDataset``: images and train-id labels in two folders, matched by name (mmseg CustomDataset).

The GTA, SYNTHIA and Cityscapes datasets are folder datasets with fixed sub-folders and suffixes.
Files are found recursively and sorted (the reference used unsorted ``os.scandir`` order; training
samples randomly and metrics accumulate over the whole set, so the order does not matter there, and a
sorted order makes runs reproducible across file systems).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dida.constants import NUM_CLASSES
from dida.data.transforms import check_train_ids, data_error, load_image, load_label
from dida.errors import DataError


class FolderDataset:
    """Image/label pairs: ``img_dir/<rel>{img_suffix}`` with ``label_dir/<rel>{label_suffix}``.

    Args:
        img_dir: folder searched recursively for ``*{img_suffix}``.
        label_dir: folder of the labels (same relative sub-path); None for an unlabelled set.
        img_suffix: image file-name suffix, e.g. ".png" or "_leftImg8bit.png".
        label_suffix: label suffix replacing ``img_suffix``, e.g. "_labelTrainIds.png".
        num_classes: labels must hold only 0..num_classes-1 and 255.
        require_labels: with a ``label_dir``, an image without its label is an error (else label None).
        convert_hint: the command that creates the labels, quoted in error messages.

    Attributes:
        samples: list of (image path, label path or None), sorted by image path.
    """

    def __init__(
        self, img_dir: str | os.PathLike[str], label_dir: str | os.PathLike[str] | None = None,
        img_suffix: str = ".png", label_suffix: str = "_labelTrainIds.png", *,
        num_classes: int = NUM_CLASSES, require_labels: bool = True, convert_hint: str = "dida convert",
    ) -> None:
        self.img_dir = Path(img_dir)
        self.label_dir = Path(label_dir) if label_dir is not None else None
        self.img_suffix = img_suffix
        self.label_suffix = label_suffix
        self.num_classes = num_classes
        if not self.img_dir.is_dir():
            raise DataError(f"{self.img_dir}: image folder not found. Check the dataset root / split "
                            "in the config (data.*.root, data.*.split).")
        if self.label_dir is not None and not self.label_dir.is_dir():
            raise DataError(f"{self.label_dir}: label folder not found. Check the dataset root / split, "
                            f"and run `{convert_hint}` to create the train-id labels.")
        rels = sorted(
            str(p.relative_to(self.img_dir))[: -len(img_suffix)]
            for p in self.img_dir.rglob(f"*{img_suffix}")
            if p.is_file() and not p.name.startswith(".")
        )
        if not rels:
            raise DataError(f"{self.img_dir}: no images ending in '{img_suffix}' found. Is the dataset "
                            "extracted into this folder?")
        self.samples: list[tuple[str, str | None]] = []
        missing = []
        for rel in rels:
            img_path = str(self.img_dir / f"{rel}{img_suffix}")
            label_path = None
            if self.label_dir is not None:
                candidate = self.label_dir / f"{rel}{label_suffix}"
                if candidate.is_file():
                    label_path = str(candidate)
                elif require_labels:
                    missing.append(img_path)
            self.samples.append((img_path, label_path))
        if missing:
            raise DataError(
                f"{missing[0]}: image without its label {self.label_dir}/...{label_suffix} "
                f"({len(missing)} of {len(rels)} images lack one). Run `{convert_hint}` to create the "
                "train-id labels, or remove the images."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.img_dir}, {len(self)} samples)"

    @property
    def has_labels(self) -> bool:
        return all(label is not None for _, label in self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample ``index`` as (BGR uint8 [H, W, 3], train-id uint8 [H, W] or None).

        Raises:
            DataError: unreadable/truncated file, label ids out of range, image/label size mismatch.
        """
        img_path, label_path = self.samples[index]
        img = load_image(img_path)
        if label_path is None:
            return img, None
        label = load_label(label_path)
        if label.shape != img.shape[:2]:
            raise data_error(label_path, f"label size {label.shape[1]}x{label.shape[0]} differs from the "
                                         f"image {img_path} ({img.shape[1]}x{img.shape[0]}). Remove the pair "
                                         "or re-create the label.")
        check_train_ids(label, label_path, self.num_classes)
        return img, label
