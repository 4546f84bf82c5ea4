"""Writers of tiny datasets in the real on-disk formats (re-exported from ``dida.data.fake``).

The writers live in the package so that tests of other subsystems (engine, evaluation, bank) can use
them too; this module is the tests' entry point and adds small helpers for corrupt files.
"""

from __future__ import annotations

from pathlib import Path

from dida.data.fake import (
    block_label_map,
    cityscapes_polygons,
    write_cityscapes_sample,
    write_fake_cityscapes,
    write_fake_gta,
    write_fake_synthia,
    write_gta_label,
    write_synthia_label,
)


def truncate_file(path: str | Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its bytes (a truncated download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
