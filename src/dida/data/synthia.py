"""SYNTHIA-RAND-CITYSCAPES: ``<root>/RGB/NNNNNNN.png`` with ``<root>/GT/LABELS/NNNNNNN_labelTrainIds.png``."""

from __future__ import annotations

import os
from pathlib import Path

from dida.constants import NUM_CLASSES
from dida.data.folder import FolderDataset
from dida.errors import DataError


class SynthiaDataset(FolderDataset):
    """The SYNTHIA source dataset; labels are the train-id files written by ``dida convert synthia``."""

    def __init__(self, root: str | os.PathLike[str], *, num_classes: int = NUM_CLASSES) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: SYNTHIA root not found. It must hold RGB/ and GT/LABELS/.")
        self.root = root
        super().__init__(root / "RGB", root / "GT" / "LABELS", ".png", "_labelTrainIds.png",
                         num_classes=num_classes, convert_hint=f"dida convert synthia {root}")
