"""The table of dataset kinds: the one place that lists them.

``data.*.kind`` in the configuration, ``dida convert KIND``, ``dida bank build --dataset``, evaluation's
class-count check and the default data roots all read ``DATASET_KINDS``. Adding a dataset is a dataset
class plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dida.config import DatasetCfg


@dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset.

    Attributes:
        build: ``build(cfg, root, num_classes)`` -> the dataset (``samples``, ``load(i)``, ``__len__``).
        folder: its folder under ``$DIDA_DATA_ROOT`` (``data/`` when unset) when ``root`` is empty; None
            when a root must be given.
        num_classes: the size of its label space (19 Cityscapes train ids), or None for any.
        converter: ``"module:function"`` of its label converter (``dida convert KIND``), or None.
        source_scale: the reference's keep-ratio resize of its training pipeline (long, short), the
            default test scale of ``dida bank build`` on it.
        description: one line for ``--help``.
    """

    build: Callable[[DatasetCfg, Path, int | None], Any]
    folder: str | None
    num_classes: int | None
    converter: str | None
    source_scale: tuple[int, int] | None
    description: str


def _gta(cfg: DatasetCfg, root: Path, num_classes: int | None) -> Any:
    from dida.data.gta import GTADataset

    return GTADataset(root, **_classes(num_classes))


def _synthia(cfg: DatasetCfg, root: Path, num_classes: int | None) -> Any:
    from dida.data.synthia import SynthiaDataset

    return SynthiaDataset(root, **_classes(num_classes))


def _cityscapes(cfg: DatasetCfg, root: Path, num_classes: int | None) -> Any:
    from dida.data.cityscapes import CityscapesDataset

    return CityscapesDataset(root, cfg.split, **_classes(num_classes))


def _folder(cfg: DatasetCfg, root: Path, num_classes: int | None) -> Any:
    from dida.data.folder import FolderDataset

    label_dir = root / cfg.label_dir if cfg.label_dir else None
    return FolderDataset(root / cfg.img_dir, label_dir, cfg.img_suffix, cfg.label_suffix, **_classes(num_classes))


def _classes(num_classes: int | None) -> dict[str, int]:
    return {} if num_classes is None else {"num_classes": num_classes}


DATASET_KINDS: dict[str, DatasetKind] = {
    "gta": DatasetKind(_gta, "gta", 19, "dida.data.convert:convert_dataset", (1280, 720),
                       "GTA5 (images/, labels/ with Cityscapes label ids)"),
    "synthia": DatasetKind(_synthia, "synthia", 19, "dida.data.convert:convert_dataset", (1280, 760),
                           "SYNTHIA-RAND-CITYSCAPES (RGB/, GT/LABELS/ 16-bit)"),
    "cityscapes": DatasetKind(_cityscapes, "cityscapes", 19, "dida.data.convert:convert_dataset", (1024, 512),
                              "Cityscapes (leftImg8bit/, gtFine/ polygons or label ids)"),
    "folder": DatasetKind(_folder, None, None, None, None,
                          "any images/ + labels/ folder pair with train-id PNGs (matched by name)"),
}


def default_root(kind: str) -> str | None:
    """``$DIDA_DATA_ROOT/<folder>`` (``data/<folder>`` when unset) for a kind with a default folder."""
    import os

    folder = DATASET_KINDS[kind].folder
    return None if folder is None else os.path.join(os.environ.get("DIDA_DATA_ROOT", "data"), folder)


def convertible_kinds() -> list[str]:
    """Kinds that ``dida convert`` handles."""
    return [name for name, kind in DATASET_KINDS.items() if kind.converter]
