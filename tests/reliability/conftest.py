"""Shared fixtures of the reliability tests: the tiny generated GTA -> Cityscapes pair of ``fake_data``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def rel_data(fake_data) -> Path:
    """``gta/`` and ``cs/``. Read-only: tests that damage data copy it first (see ``rel_data_copy``)."""
    return fake_data / "tiny_cpu"


@pytest.fixture
def rel_data_copy(rel_data, tmp_path) -> Path:
    """A private copy of the tiny datasets that a test may corrupt or delete."""
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(rel_data, dst)
    return dst
