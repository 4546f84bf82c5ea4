"""GTA5: ``<root>/images/NNNNN.png`` with ``<root>/labels/NNNNN_labelTrainIds.png`` (spec 2.1)."""

from __future__ import annotations

import os
from pathlib import Path

from dida.constants import NUM_CLASSES
from dida.data.folder import FolderDataset
from dida.errors import DataError


class GTADataset(FolderDataset):
    """The GTA5 source dataset; labels are the train-id files written by ``dida convert gta``."""

    def __init__(self, root: str | os.PathLike[str], *, num_classes: int = NUM_CLASSES) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: GTA root not found. It must hold images/ and labels/.")
        self.root = root
        super().__init__(root / "images", root / "labels", ".png", "_labelTrainIds.png",
                         num_classes=num_classes, convert_hint=f"dida convert gta {root}")
