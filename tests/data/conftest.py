"""Fixtures of tests/data: the tiny converted GTA / SYNTHIA / Cityscapes datasets of the shared
``fake_data`` fixture (profile ``formats``; session-scoped, read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gta_root(fake_data) -> Path:
    return fake_data / "formats" / "gta"  # 6 images, 96x64


@pytest.fixture(scope="session")
def synthia_root(fake_data) -> Path:
    return fake_data / "formats" / "synthia"  # 4 images, 96x57


@pytest.fixture(scope="session")
def cityscapes_root(fake_data) -> Path:
    return fake_data / "formats" / "cityscapes"  # train and val, 3 images each, 128x64
