"""Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png``."""

from __future__ import annotations

import os
from pathlib import Path

from dida.constants import NUM_CLASSES
from dida.data.folder import FolderDataset
from dida.errors import DataError


class CityscapesDataset(FolderDataset):
    """One Cityscapes split; labels are the train-id files written by ``dida convert cityscapes``.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: "train", "val" or "test" (any sub-folder name works).
        require_labels: False allows a split without labels (``load`` then returns label None).
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train", *, num_classes: int = NUM_CLASSES,
                 require_labels: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: Cityscapes root not found. It must hold leftImg8bit/ and gtFine/.")
        self.root = root
        self.split = split
        label_dir = root / "gtFine" / split
        if not require_labels and not label_dir.is_dir():
            label_dir = None
        super().__init__(root / "leftImg8bit" / split, label_dir, "_leftImg8bit.png",
                         "_gtFine_labelTrainIds.png", num_classes=num_classes, require_labels=require_labels,
                         convert_hint=f"dida convert cityscapes {root}")
