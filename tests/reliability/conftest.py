"""Shared fixtures of the reliability tests: a tiny generated GTA -> Cityscapes pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from dida.data.fake import write_fake_cityscapes, write_fake_gta


@pytest.fixture(scope="session")
def rel_data(tmp_path_factory) -> Path:
    """Read-only by convention: tests that damage data copy it first (see ``rel_data_copy``)."""
    root = tmp_path_factory.mktemp("rel_data")
    write_fake_gta(root / "gta", n=6, size=(192, 108), seed=0)
    write_fake_cityscapes(root / "cs", splits=("train", "val"), n_per_split=3, size=(256, 128), seed=1)
    return root


@pytest.fixture
def rel_data_copy(rel_data, tmp_path) -> Path:
    """A private copy of the tiny datasets that a test may corrupt or delete."""
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(rel_data, dst)
    return dst
